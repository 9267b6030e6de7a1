"""The embedded model end to end: SmolLM2-135M (GGUF) over Shakespeare → store → site, through the CLI."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import duckdb
import pytest

from featureatlas.build.shards import read_js
from featureatlas.cli import main
from featureatlas.load.corpus import embedded_corpus

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--out", str(out), "--tokens", "1500", "--layers", "0,29", "--resid", "29", "--top-k", "5",
                 "--batch-size", "8", "--sae-layer", "15", "--sae-features", "64", "--sae-k", "8",
                 "--sae-tokens", "1500", "--sae-steps", "20", "--heads", "0", "--explain", "1"])
    assert code == 0
    return out


def test_store_holds_neurons_residual_dimensions_sae_and_transcoder_features(demo: Path) -> None:
    con = duckdb.connect(str(demo / "store.duckdb"), read_only=True)
    run = con.execute("SELECT model, n_tokens, context_length, top_k, layers, bos_token, bos_excluded "
                      "FROM runs").fetchone()
    assert run == ("SmolLM2-135M-Instruct", 1500, 64, 5, [0, 29], "<|im_start|>", True)
    assert con.execute("SELECT source, layer, n_units, kind FROM sources ORDER BY source, layer").fetchall() == [
        ("attn", 0, 9, "attn"), ("mlp", 0, 1536, "mlp"), ("mlp", 29, 1536, "mlp"), ("resid", 29, 576, "resid"),
        ("sae:res15", 15, 64, "sae"),
        ("transcoder:mlp15", 15, 64, "transcoder")]
    units = 9 + 3072 + 576 + 64 + 64
    assert con.execute("SELECT count(*), count(max_activation) FROM units").fetchone() == (units, units)
    kinds = dict(con.execute("SELECT example_kind, count(DISTINCT (source, layer, unit)) FROM examples "
                             "GROUP BY ALL").fetchall())
    assert kinds["top"] == units and kinds["bottom"] == 3072 + 576 and kinds["quantile"] > 0 and kinds["random"] > 0
    assert con.execute("SELECT count(*) FROM examples WHERE example_kind = 'top'").fetchone()[0] == units * 5
    assert con.execute("SELECT count(DISTINCT (source, layer, unit)) FROM logit_effects").fetchone()[0] == units - 9
    assert con.execute("SELECT count(DISTINCT (source, layer, unit)), count(DISTINCT unit) FROM attributions "
                       "WHERE source = 'attn'").fetchone() == (9, 9)  # where each head looked
    explained = con.execute("SELECT source, score_kind, score FROM explanations ORDER BY score_kind").fetchall()
    assert [(s, k) for s, k, _ in explained] == [("sae:res15", "detection balanced accuracy"),
                                                 ("sae:res15", "fuzzing balanced accuracy")]
    assert all(0 <= score <= 1 for _, _, score in explained)
    assert (demo / "sae" / "blocks.15.hook_resid_post" / "cfg.json").is_file()
    assert (demo / "transcoder" / "layers.15.mlp" / "sae.safetensors").is_file()  # sparsify's layout
    # every example's stored max is its activation at max_position, and no other counted position beats it
    bad = con.execute("""
        SELECT count(*) FROM examples e JOIN contexts c USING (context_id)
        WHERE (e.example_kind != 'bottom' AND (e.activations[e.max_position + 1] != e.max_activation
                                               OR list_max(e.activations[2:]) != e.max_activation))
           OR (e.example_kind = 'bottom' AND (e.activations[e.max_position + 1] != e.max_activation
                                              OR list_min(e.activations[2:]) != e.max_activation))
           OR len(e.activations) != len(c.tokens) OR c.tokens[1] != '<|im_start|>'""").fetchone()[0]
    assert bad == 0
    # the display strings read back as the corpus text
    first_file = sorted(Path(str(embedded_corpus().parent)).glob("*_gut.txt"))[0].read_text()
    tokens = con.execute("SELECT tokens FROM contexts WHERE context_id = 0").fetchone()
    if tokens:
        assert first_file.startswith("".join(tokens[0][1:]))


def test_site_fits_free_static_hosts(demo: Path) -> None:
    """A layer page and a unit page per layer, data shards of 256 units, a search index: few files, few bytes."""
    site = demo / "site"
    files = [p for p in site.rglob("*") if p.is_file()]
    layers = 6
    assert len([p for p in files if p.name == "unit.html"]) == layers
    assert len(files) < 20_000 and sum(p.stat().st_size for p in files) < 1e9
    assert len([p for p in files if p.parent.name in ("d", "c")]) == 2 * (1 + 6 + 6 + 3 + 1 + 1)  # ceil(units / 256)
    index = (site / "index.html").read_text()
    assert "SmolLM2-135M-Instruct" in index and str(demo) not in index  # no path of the building machine
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert "Content-Security-Policy" in text and "<script>" not in text and str(demo) not in text


CRAWL = """async (units) => {
  const seen = [];
  for (const u of units) {
    const drawn = new Promise(resolve => document.addEventListener("featureatlas:unit", e => resolve(e.detail),
                                                                    { once: true }));
    location.hash = "#" + u;
    const got = await drawn;
    if (got !== u || document.querySelector("h1").textContent.split(" ").pop() !== String(u)) seen.push(u);
  }
  return seen;
}"""


# Tabs that draw the units side by side: one tab mostly waits for its frames; the others' drawing fills the wait.
TABS = 4
DRAW_ALL, DRAW_EVERY = 32, 48  # units drawn per page: the first DRAW_ALL, then every DRAW_EVERY-th


@pytest.mark.browser
def test_crawl_the_whole_site_in_a_browser(demo: Path) -> None:
    """Every page of the demo site opened from file:// in Debian's chromium: no broken internal link, no request
    outside the site, no console error or CSP violation; every unit of a small source drawn, and of a large one
    the first DRAW_ALL and every DRAW_EVERY-th after (all its shards: drawing is the same code for every unit)."""
    from helpers.browser import LAUNCH_ARGS, WATCH, require_browser

    require_browser()
    from playwright.sync_api import sync_playwright

    site = (demo / "site").resolve()
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=LAUNCH_ARGS)
        tabs = [browser.new_page() for _ in range(TABS)]
        for tab in tabs:
            tab.add_init_script(WATCH)
            tab.on("console", lambda m, tab=tab: problems.append(f"{tab.url}: {m.text}")
                   if m.type in ("error", "warning") else None)
            tab.on("pageerror", lambda e, tab=tab: problems.append(f"{tab.url}: {e}"))
            tab.on("requestfailed", lambda r: problems.append(f"failed {r.url}"))
            tab.on("request", lambda r: None if r.url.startswith(("file://" + str(site), "data:", "blob:"))
                   else problems.append(f"outside the site: {r.url}"))
        page = tabs[0]
        pages = sorted(site.rglob("*.html"))
        for path in pages:
            page.goto(path.as_uri())
            links = page.eval_on_selector_all("a[href]", "els => els.map(a => a.href)")
            for link in links:
                target = link.split("#")[0]
                assert target.startswith("file://"), (path, link)
                assert Path(urllib.parse.unquote(target[len("file://"):])).is_file(), (path, link)
            if path.name == "unit.html":
                shards = sorted(path.parent.glob("d/*.js"))
                units = [u["u"] for shard in shards for u in read_js(shard.read_text())[1]["units"]]
                drawn = units[:DRAW_ALL] + units[DRAW_ALL::DRAW_EVERY]
                share = -(-len(drawn) // TABS)
                for i, tab in enumerate(tabs):  # every tab draws its share of the units; all drawn, none missed
                    if tab is not page:
                        tab.goto(path.as_uri())
                    tab.evaluate(f"units => {{ window.__crawl = ({CRAWL})(units); }}", drawn[i * share:(i + 1) * share])
                assert [u for tab in tabs for u in tab.evaluate("window.__crawl")] == []
                assert len(units) == {"attn": 9, "mlp": 1536, "resid": 576, "sae-res15": 64,
                                      "transcoder-mlp15": 64}[path.parent.parent.name]
                for tab in tabs[1:]:
                    problems += tab.evaluate("window.__problems")
            problems += page.evaluate("window.__problems")
        page.goto((site / "search.html").as_uri() + "?q=the")
        page.locator("#results .results").first.wait_for()
        browser.close()
    assert problems == []
    assert len(pages) == 2 + 2 * 6 + 2  # and a map page for each dictionary (the SAE and the transcoder)
