"""The static site: layout, links, escaping, content checked against the store, and safe publishing."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import BOS, MODEL, PLAIN_TOKENS, make_store

from featureatlas.build import unit_pages
from featureatlas.build.numbers import decode_activations, encode_activations, format_activation
from featureatlas.build.output import MARKER, SiteError
from featureatlas.build.serve import make_server
from featureatlas.build.site import build_site
from featureatlas.build.slugs import slugify, unique_slugs
from featureatlas.build.tokens import token_html, token_text
from featureatlas.store.schema import StoreError, open_store

CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:"
# Raw characters that must never reach a page: controls (other than newline) and direction overrides.
FORBIDDEN_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f]")


class Page(HTMLParser):
    """Everything the tests look at in one pass: tags, attributes, ids, and each example's tokens."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.ids: set[str] = set()
        self.examples: list[dict] = []  # per .ctx: acts, and per token: classes and text
        self.csp: str | None = None
        self._token: dict | None = None
        self._depth_in_token = 0
        self._in_ctx = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if a.get("id"):
            self.ids.add(a["id"] or "")
        if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy":
            self.csp = a.get("content")
        classes = (a.get("class") or "").split()
        if tag == "div" and "ctx" in classes:
            self._in_ctx = True
            self.examples.append({"acts": a.get("data-acts"), "tokens": []})
        elif self._in_ctx and tag == "b" and self._token is None:
            self._token = {"classes": classes, "text": "", "tabindex": a.get("tabindex")}
            self.examples[-1]["tokens"].append(self._token)
        elif self._token is not None:
            self._depth_in_token += 1

    def handle_endtag(self, tag: str) -> None:
        if self._token is not None:
            if self._depth_in_token:
                self._depth_in_token -= 1
            else:
                self._token = None
        elif self._in_ctx and tag == "div":
            self._in_ctx = False

    def handle_data(self, data: str) -> None:
        if self._token is not None:
            self._token["text"] += data


def pages(site: Path) -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in sorted(site.rglob("*.html"))}


def layer_dir(site: Path, layer: int) -> Path:
    return site / slugify(MODEL) / "mlp" / str(layer)


def store_unit(store: Path, layer: int, unit: int) -> tuple[float | None, list[tuple]]:
    con = open_store(store)
    try:
        (top,) = con.execute("SELECT max_activation FROM units WHERE layer = ? AND unit = ?", [layer, unit]).fetchone()
        rows = con.execute("""SELECT e.rank, e.max_activation, e.max_position, e.activations, c.tokens
                              FROM examples e JOIN contexts c USING (context_id)
                              WHERE layer = ? AND unit = ? ORDER BY rank""", [layer, unit]).fetchall()
    finally:
        con.close()
    return top, rows


# --- layout -----------------------------------------------------------------------------------------

def test_layout_and_page_counts(site_dir: Path) -> None:
    assert (site_dir / "index.html").is_file()
    assert (site_dir / MARKER).is_file()
    assert (site_dir / "static" / "style.css").is_file() and (site_dir / "static" / "site.js").is_file()
    for layer in (0, 1):
        folder = layer_dir(site_dir, layer)
        assert (folder / "index.html").is_file()
        assert sorted(int(p.stem) for p in folder.glob("*.html") if p.stem != "index") == list(range(50))
    assert len(pages(site_dir)) == 1 + 2 + 2 * 50


def test_every_page_has_the_csp_and_no_inline_code(site_dir: Path) -> None:
    for path, text in pages(site_dir).items():
        page = Page(text)
        assert page.csp == CSP, path
        for tag, attrs in page.tags:
            assert tag not in {"style", "iframe", "object", "embed", "img", "textarea", "form"}, (path, tag)
            assert "style" not in attrs, (path, tag)
            assert not any(name.startswith("on") for name in attrs), (path, tag, attrs)
            if tag == "script":
                assert (attrs.get("src") or "").endswith("static/site.js"), path
        assert "<script>" not in text and "<script " not in text.replace('<script src="', ""), path


def test_internal_links_resolve_and_nothing_is_external(site_dir: Path) -> None:
    all_pages = pages(site_dir)
    ids = {path: Page(text).ids for path, text in all_pages.items()}
    checked = 0
    for path, text in all_pages.items():
        for _, attrs in Page(text).tags:
            for name in ("href", "src", "action", "poster", "srcset"):
                url = attrs.get(name)
                if url is None:
                    continue
                assert not re.match(r"^\s*(https?:|//|ftp:|javascript:|file:)", url, re.I), (path, url)
                if url.startswith("data:"):
                    assert name == "href" and url == "data:,", (path, url)  # the empty favicon only
                    continue
                target, _, fragment = url.partition("#")
                resolved = (path.parent / target).resolve() if target else path
                assert resolved.is_file(), (path, url)
                assert site_dir.resolve() in resolved.parents, (path, url)
                if fragment:
                    assert fragment in ids[resolved], (path, url)
                checked += 1
    assert checked > 500
    for name in ("style.css", "site.js"):
        static = (site_dir / "static" / name).read_text()
        assert "http:" not in static and "https:" not in static and "url(" not in static
        assert not re.search(r"\.(innerHTML|outerHTML)\b|insertAdjacentHTML|document\.write|eval\(", static)


# --- escaping ---------------------------------------------------------------------------------------

def test_hostile_strings_render_as_text(site_dir: Path) -> None:
    all_pages = pages(site_dir)
    joined = "\n".join(all_pages.values())
    for path, text in all_pages.items():
        assert not FORBIDDEN_CHARS.search(text), (path, FORBIDDEN_CHARS.search(text))
        assert "<script>alert" not in text and "<img" not in text and "</textarea>" not in text, path
        assert "<b>v1" not in text and "<b>docs" not in text, path  # the model name and the corpus path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in joined
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in joined
    assert "&lt;/textarea&gt;" in joined
    assert "a<i>\\x00</i>b" in joined  # NUL as a visible escape
    assert "<i>\\u202e</i>evil" in joined  # direction override as an escape
    assert "\\u202egnp.exe" in joined  # also in document names
    assert "{{ 7*7 }}" in joined  # store text is never evaluated as a template
    index = all_pages[site_dir / "index.html"]
    assert "Tiny &#34;LM&#34; &lt;b&gt;v1&lt;/b&gt;/../x" in index


def test_token_display() -> None:
    assert token_html("\n") == "<i>\u23ce\n</i>"  # a visible symbol, then the line break
    assert token_html("  ") == "<i>\u00b7\u00b7</i>"
    assert token_html(" the") == " the"
    assert token_html("\t") == "<i>\u21e5</i>"
    assert token_html("a  b") == "a<i>\u00b7\u00b7</i>b"
    assert token_html("<b>&") == "&lt;b&gt;&amp;"
    assert token_html("x\u202ey") == "x<i>\\u202e</i>y"
    assert token_text("one\ntwo") == "one\u23cetwo"
    assert token_text("<\x00>") == "&lt;\\x00&gt;"
    assert token_html("\r\n") == "<i>\\r\u23ce\n</i>" and token_html("\x7f\x85") == "<i>\\x7f\\x85</i>"


def test_slugs() -> None:
    assert slugify("SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("..") == "x" and slugify("") == "x" and slugify("///") == "x"
    assert slugify("static") == "static-"
    assert slugify("a..b") == "a.b"
    assert all(re.fullmatch(r"[a-z0-9._-]+", slugify(name)) for name in ["\u00e9t\u00e9", "A B", "<x>", "."])
    assert unique_slugs(["A/B", "a-b", "a b"]) == {"A/B": "a-b", "a-b": "a-b-2", "a b": "a-b-3"}


def test_activation_encoding() -> None:
    values = np.array([0, 0.1234, -0.01234, 1.5, 12345.6, 0.9996, -2e-7, np.nan, np.inf, -np.inf], dtype=np.float32)
    text = encode_activations(values)
    assert len(text) == 3 * len(values) and re.fullmatch(r"[A-Za-z0-9_-]*", text)
    decoded = decode_activations(text)
    assert decoded[:7] == [0, 0.123, -0.0123, 1.5, 12300, 1, -2e-7] and np.isnan(decoded[7])
    assert decoded[8:] == [np.inf, -np.inf]
    assert encode_activations(np.array([], dtype=np.float32)) == ""
    # Every float32 comes back as its three significant digits, over the whole range, subnormals included.
    rng = np.random.default_rng(1)
    spread = rng.standard_normal(20_000) * 10.0 ** rng.uniform(-46, 38.5, 20_000)
    spread = spread[np.abs(spread) <= np.finfo(np.float32).max].astype(np.float32)
    spread[:4] = [np.finfo(np.float32).max, -np.finfo(np.float32).smallest_subnormal, 999.6, -0.09996]
    assert decode_activations(encode_activations(spread)) == [float(f"{v:.3g}") for v in spread.tolist()]
    assert format_activation(None) == "\u2014" and format_activation(float("nan")) == "\u2014"
    assert format_activation(3.14159) == "3.142"


# --- content ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer,unit", [(0, 0), (1, 7), (1, 5), (0, 4)])
def test_unit_page_matches_the_store(site_dir: Path, store_path: Path, layer: int, unit: int) -> None:
    top, rows = store_unit(store_path, layer, unit)
    text = (layer_dir(site_dir, layer) / f"{unit}.html").read_text()
    page = Page(text)
    assert f'<dd class="big">{format_activation(top)}</dd>' in text
    assert f'<dd class="big">{len(rows)}</dd>' in text
    ranks = [int(r) for r in re.findall(r'<span class="rank">#(\d+)</span>', text)]
    assert ranks == [row[0] for row in rows] == list(range(1, len(rows) + 1))
    shown_max = re.findall(r'<span class="act">([^<]+)</span>', text)
    assert shown_max == [format_activation(row[1]) for row in rows]
    assert len(page.examples) == len(rows)
    for example, (_, _, position, activations, tokens) in zip(page.examples, rows, strict=True):
        acts = decode_activations(example["acts"])
        assert len(acts) == len(example["tokens"]) == len(tokens) == len(activations)
        assert acts == [float(f"{a:.3g}") for a in activations]  # three significant digits, exactly
        marked = [i for i, tok in enumerate(example["tokens"]) if "m" in tok["classes"]]
        assert marked == [position]
        assert example["tokens"][position]["tabindex"] == "0"
        assert "bos" in example["tokens"][0]["classes"] and tokens[0] == BOS
        colours = [c for tok in example["tokens"] for c in tok["classes"] if re.fullmatch(r"[an]\d", c)]
        assert all(1 <= int(c[1]) <= unit_pages.BUCKETS for c in colours)
    if top is not None and top > 0:  # the unit's own max gets the strongest colour
        first = page.examples[0]["tokens"][rows[0][2]]["classes"]
        assert f"a{unit_pages.BUCKETS}" in first
    if unit == 4:  # never positive: the colours are on the negative scale
        classes = {c for tok in page.examples[0]["tokens"] for c in tok["classes"]}
        assert any(c.startswith("n") for c in classes) and not any(re.fullmatch(r"a\d", c) for c in classes)


def test_unit_without_examples(site_dir: Path) -> None:
    text = (layer_dir(site_dir, 0) / "3.html").read_text()
    assert "No examples" in text and '<dd class="big">\u2014</dd>' in text
    assert '<div class="ctx"' not in text
    layer = (layer_dir(site_dir, 0) / "index.html").read_text()
    assert re.search(r'<a href="3.html">3</a></td><td>\u2014</td><td>0</td><td><span class="none">no examples', layer)


def test_prev_next_up_links(site_dir: Path) -> None:
    def nav(unit: int) -> dict[str, str]:
        text = (layer_dir(site_dir, 1) / f"{unit}.html").read_text()
        return dict((rel, href) for href, rel in
                    ((a.get("href"), a.get("rel")) for tag, a in Page(text).tags if tag == "a") if rel)

    assert nav(0) == {"up": "index.html", "next": "1.html"}
    assert nav(10) == {"prev": "9.html", "up": "index.html", "next": "11.html"}
    assert nav(49) == {"prev": "48.html", "up": "index.html"}
    layer0 = (layer_dir(site_dir, 0) / "index.html").read_text()
    assert 'rel="next" href="../1/index.html"' in layer0 and 'rel="prev"' not in layer0


def test_layer_page_lists_every_unit_with_a_snippet(site_dir: Path, store_path: Path) -> None:
    text = (layer_dir(site_dir, 1) / "index.html").read_text()
    rows = re.findall(r'<tr><td><a href="(\d+)\.html">\d+</a></td><td>([^<]*)</td><td>(\d+)</td><td>(.*?)</td></tr>',
                      text)
    assert [int(r[0]) for r in rows] == list(range(50))
    assert "<b" not in "".join(r[3] for r in rows if r[2] != "0")  # plain text, no per-token elements
    top, examples = store_unit(store_path, 1, 7)
    _, _, position, _, tokens = examples[0]
    assert rows[7][1] == format_activation(top)
    assert f"<mark>{token_text(tokens[position])}</mark>" in rows[7][3]
    assert all(r[3].count("<mark>") == 1 for r in rows if r[2] != "0")


def test_index_lists_models_sources_layers_and_run(site_dir: Path) -> None:
    text = (site_dir / "index.html").read_text()
    slug = slugify(MODEL)
    assert f'href="{slug}/mlp/0/index.html"' in text and f'href="{slug}/mlp/1/index.html"' in text
    for fact in ("corpus/&lt;b&gt;docs&lt;/b&gt;", "1,800", "<dd>16</dd>", "<dd>5</dd>", "float32", "2025-01-02 04:05"):
        assert fact in text
    assert "100 units in 2 layers" in text and "49 active" in text


def test_unit_pages_stay_small(tmp_path: Path) -> None:
    """20 examples of 64 tokens: tiny per-token markup (`<b>`) and three characters a token in data-acts."""
    store = make_store(tmp_path / "big.duckdb", n_layers=1, n_units=8, k=20, context_length=64,
                       vocabulary=PLAIN_TOKENS + ["\n"])
    build_site(store, tmp_path / "site", workers=1, progress=False)
    sizes = {int(path.stem): path.stat().st_size for path in (tmp_path / "site").glob("*/mlp/0/[0-9]*.html")}
    assert len(sizes) == 8 and sizes[3] < 3_000, sizes  # unit 3 has no examples
    assert max(size for unit, size in sizes.items() if unit not in (3, 4)) < 28_000, sizes
    assert sizes[4] < 40_000, sizes  # every token of unit 4 is coloured: one class per token


def test_two_models_and_parallel_workers(tmp_path: Path) -> None:
    """Two models in one store, built by worker processes: each model has its own folder and index entry."""
    store = make_store(tmp_path / "a.duckdb", n_layers=1, n_units=30, models=("static", "Other/Model"))
    out = tmp_path / "site"
    summary = build_site(store, out, workers=2, progress=False)
    assert summary.pages == 1 + 2 * (1 + 30) and summary.index == out / "index.html"
    assert (out / "static-" / "mlp" / "0" / "29.html").is_file()  # "static" must not clash with static/
    assert (out / "other-model" / "mlp" / "0" / "29.html").is_file()
    assert summary.bytes == sum(p.stat().st_size for p in out.rglob("*.html"))
    index = (out / "index.html").read_text()
    assert 'id="m-static-"' in index and 'href="other-model/mlp/0/index.html"' in index
    unit = (out / "other-model" / "mlp" / "0" / "7.html").read_text()
    assert '<a href="../../../index.html#m-other-model">Other/Model</a>' in unit


# --- publishing -------------------------------------------------------------------------------------

def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_refuses_a_folder_that_is_not_a_site(tmp_path: Path, store_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SiteError, match=r"mine: folder is not empty and is not a featureatlas site"):
        build_site(store_path, out, workers=1, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []


def test_refuses_unusable_targets(tmp_path: Path, store_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SiteError, match="exists and is not a folder"):
        build_site(store_path, a_file, workers=1, progress=False)
    with pytest.raises(SiteError, match="cannot create folder"):
        build_site(store_path, a_file / "site", workers=1, progress=False)
    with pytest.raises(StoreError):
        build_site(tmp_path / "missing.duckdb", tmp_path / "site", workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_builds_into_an_empty_folder_and_rebuilds_over_a_site(tmp_path: Path, store_path: Path) -> None:
    out = tmp_path / "site"
    out.mkdir()
    build_site(store_path, out, workers=1, progress=False)
    (out / "stale.html").write_text("from an older build")
    summary = build_site(store_path, out, workers=1, progress=False)
    assert summary.pages == 103 and not (out / "stale.html").exists() and (out / MARKER).is_file()
    assert leftovers(tmp_path) == []


def test_a_crash_leaves_no_partial_output(tmp_path: Path, store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = unit_pages.write_unit_pages
    calls = []

    def fail_on_second_call(*args: object, **kwargs: object) -> tuple[int, int]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(unit_pages, "write_unit_pages", fail_on_second_call)
    out = tmp_path / "site"
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_site(store_path, out, workers=1, progress=False)
    assert not out.exists() and leftovers(tmp_path) == [] and len(calls) == 2

    monkeypatch.setattr(unit_pages, "write_unit_pages", real)
    build_site(store_path, out, workers=1, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != MARKER}
    calls.clear()
    monkeypatch.setattr(unit_pages, "write_unit_pages", fail_on_second_call)
    with pytest.raises(RuntimeError):
        build_site(store_path, out, workers=1, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != MARKER} == before
    assert leftovers(tmp_path) == []


def test_leftovers_of_a_killed_build_are_removed(tmp_path: Path, store_path: Path) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = tmp_path / f".site.{finished.pid}.partial"
    (stale / "static").mkdir(parents=True)
    running = tmp_path / f".site.{os.getppid()}.partial"  # a build that may still be going on
    running.mkdir()
    build_site(store_path, tmp_path / "site", workers=1, progress=False)
    assert leftovers(tmp_path) == [running.name]


# --- serving ----------------------------------------------------------------------------------------

def test_serve_refuses_a_folder_without_a_site(tmp_path: Path) -> None:
    with pytest.raises(SiteError, match="no index.html"):
        make_server(tmp_path, port=0)


def test_serve_serves_the_site(site_dir: Path) -> None:
    server = make_server(site_dir, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        with urllib.request.urlopen(base + "index.html", timeout=10) as response:
            assert response.status == 200 and CSP == response.headers["Content-Security-Policy"]
            assert b"featureatlas" in response.read()
        with urllib.request.urlopen(base + "static/site.js", timeout=10) as response:
            assert response.status == 200
    finally:
        server.shutdown()
        server.server_close()
