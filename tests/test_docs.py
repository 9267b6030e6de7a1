"""The README and docs/ stay usable: a short README that links every docs page, no dead relative link or anchor,
a command table that matches the CLI, and SQL examples that run against a real store."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 200
README_MAX_LINE_CHARS = 200

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`+[^`\n]*`+")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
QUERY = re.compile(r'duckdb demo/store\.duckdb "\n(.*?)"', re.S)


def markdown_files() -> list[Path]:
    """Every page whose links are checked: the README, docs/*.md and the benchmark results."""
    return [README, *sorted(DOCS.glob("*.md")), ROOT / "bench" / "RESULTS.md"]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets and '#' lines are not Markdown."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercased, punctuation other than '-' and '_' dropped, spaces as '-'."""
    text = INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings, with GitHub's -1, -2 … suffixes for repeated ones."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = github_slug(heading)
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def dead_links(path: Path) -> list[str]:
    """Relative links of a Markdown file whose target file, or heading anchor, does not exist."""
    dead = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: … are not checked here
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            dead.append(f"{path.name}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            dead.append(f"{path.name}: {target} (no heading with that anchor)")
    return dead


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"
    long = [i for i, line in enumerate(lines, 1) if len(line) > README_MAX_LINE_CHARS]
    assert not long, f"README.md lines over {README_MAX_LINE_CHARS} characters: {long}"


def test_docs_hold_only_markdown() -> None:
    others = [p.name for p in DOCS.iterdir() if p.suffix != ".md"]
    assert not others, f"docs/ holds files that are not Markdown: {others}"
    assert len(list(DOCS.glob("*.md"))) >= 10


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(prose(README.read_text(encoding="utf-8")))}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    assert (DOCS / "security.md").resolve() in linked


def test_no_dead_relative_links() -> None:
    dead = [d for path in markdown_files() for d in dead_links(path)]
    assert not dead, "dead links:\n" + "\n".join(dead)


def test_the_link_check_finds_dead_links_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "there.md").write_text("# A `code` heading: yes\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](sub/there.md) [ok](sub/there.md#a-code-heading-yes) [ok](sub/there.md#twice-1)\n"
                    "[web](https://example.org/x) [self](#top)\n# Top\n"
                    "```\n[not a link](missing-in-code.md)\n```\n`[nor](this.md)`\n"
                    "[gone](sub/gone.md) [bad anchor](sub/there.md#nowhere)\n")
    assert dead_links(page) == ["page.md: sub/gone.md (no such file)",
                                "page.md: sub/there.md#nowhere (no heading with that anchor)"]


def test_the_command_table_lists_every_command() -> None:
    from featureatlas.cli import COMMANDS

    table = re.findall(r"^\| `featureatlas ([a-z-]+)` \|", README.read_text(encoding="utf-8"), re.M)
    assert sorted(table) == sorted(COMMANDS), "README.md's command table differs from featureatlas/cli.py's commands"


@pytest.mark.parametrize("page", ["README.md", "docs/store.md"])
def test_sql_examples_run_against_a_store(page: str, store_path: Path) -> None:
    queries = QUERY.findall((ROOT / page).read_text(encoding="utf-8"))
    assert len(queries) >= 3, f"{page}: expected its duckdb examples"
    con = duckdb.connect(str(store_path), read_only=True)
    try:
        rows = [con.execute(sql).fetchall() for sql in queries]
    finally:
        con.close()
    assert any(rows), f"{page}: every example query came back empty on the synthetic store"
