"""The site in a real browser, from file:// under its CSP: navigation, tooltips, keyboard, no injected code.

Needs Debian's chromium at /usr/bin/chromium and the playwright Python package (no downloaded browser).
Skipped when either is missing, unless FEATUREATLAS_REQUIRE_BROWSER=1 makes that a failure.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from pathlib import Path

import pytest

from featureatlas.build.numbers import decode_activations
from featureatlas.build.shards import SHARD_UNITS, context_token_indices, read_js

from helpers.browser import SHOTS, assert_clean, expect

pytestmark = pytest.mark.browser

def tooltip(page: object) -> str:
    tip = page.locator("#tip")  # type: ignore[attr-defined]
    tip.wait_for(state="visible", timeout=2000)
    return tip.inner_text()


def shown_activation(text: str) -> float:
    match = re.search(r"activation (\S+)", text)
    assert match, text
    return float(match.group(1))


def unit_url(site: Path, source: str, layer: int, unit: int) -> str:
    return next(site.glob(f"*/{source}/{layer}/unit.html")).as_uri() + f"#{unit}"


def unit_data(site: Path, source: str, layer: int, unit: int) -> tuple[dict, dict]:
    """The data shard of a unit (what unit.js draws the page from) and the unit's entry."""
    path = next(site.glob(f"*/{source.replace(':', '-')}/{layer}/d/{unit // SHARD_UNITS}.js"))
    shard = read_js(path.read_text())[1]
    return shard, next(row for row in shard["units"] if row["u"] == unit)


def test_browse_from_file_url(page: object, site_dir: Path) -> None:
    page.goto((site_dir / "index.html").as_uri())  # type: ignore[attr-defined]
    assert page.evaluate("document.documentElement.classList.contains('js')")  # core.js ran under the CSP
    assert page.evaluate("getComputedStyle(document.body).fontFamily").startswith("system-ui")  # CSS loaded
    page.get_by_role("link", name=re.compile(r"^Layer 1\b")).first.click()  # the MLP neurons come first
    assert page.url.endswith("/mlp/1/index.html")
    assert page.locator("#units tbody tr").count() == 50
    assert_clean(page)

    page.fill("#filter", "17")
    assert page.locator("#units tbody tr:visible").count() == 1
    page.fill("#filter", "")
    page.get_by_role("button", name=re.compile(r"^Max\b(?! \|)")).click()  # not "Max |act|"
    values = page.locator("#units tbody tr td:nth-child(2)").all_inner_texts()
    numbers = [float(v) for v in values if v != "\u2014"]
    assert numbers == sorted(numbers, reverse=True)

    page.get_by_role("link", name="7", exact=True).click()
    assert page.url.endswith("/mlp/1/unit.html#7")
    expect(page.locator("h1")).to_have_text("Neuron 7")
    assert page.title().startswith("Neuron 7 \u00b7 layer 1 \u00b7 mlp")
    assert_clean(page)


@pytest.mark.parametrize("source,layer,unit", [("mlp", 1, 7), ("resid", 1, 9), ("sae:res", 1, 0), ("mlp", 0, 4)])
def test_unit_page_draws_its_data(page: object, site_dir: Path, source: str, layer: int, unit: int) -> None:
    """Every example of the shard is drawn, token by token, with the max token outlined and focusable, the
    strongest colour on the unit's max (min, for bottom examples); statistics, histogram bars and logits too."""
    shard, row = unit_data(site_dir, source, layer, unit)
    page.goto(unit_url(site_dir, source.replace(":", "-"), layer, unit))  # type: ignore[attr-defined]
    page.locator("#stats").wait_for()
    for kind, section in (("top", "top"), ("bottom", "bottom"), ("quantile", "quantiles"), ("random", "random")):
        examples = row["ex"].get(kind, [])
        drawn = page.locator(f"#{section} .ctx")
        assert drawn.count() == len(examples), kind
        for i, ex in enumerate(examples[:3]):
            ctx = shard["ctx"][ex[0]]
            n = len(decode_activations(ex[4]))
            tokens = drawn.nth(i).locator(":scope > b")
            assert tokens.count() == n
            indices = context_token_indices(shard, ex[0])
            raw = [shard["toks"][t] for t in indices[ex[1] - ctx[2]:ex[1] - ctx[2] + n]]
            assert tokens.evaluate_all("els => els.map(e => e.textContent.length > 0)") == [True] * n
            marked = tokens.evaluate_all("els => els.map(e => e.classList.contains('m'))")
            assert marked.index(True) == ex[2] - ex[1] and marked.count(True) == 1
            if i == 0 and kind in ("top", "bottom") and (row["s"][0] > 0 if kind == "top" else row["s"][1] < 0):
                strongest = "a9" if kind == "top" else "n9"
                assert strongest in tokens.nth(ex[2] - ex[1]).get_attribute("class")
            assert raw  # the shard holds the tokens the page shows
    facts = page.locator("#stats dl div").all_inner_texts()
    assert any(text.startswith("TOKENS COUNTED") or text.startswith("Tokens counted") for text in facts)
    if "h" in row:
        assert page.locator("#histogram svg rect").count() == sum(count > 0 for count in row["h"][1])
    assert page.locator("#logits tbody tr").count() == len(row["lt"]) + len(row["lb"])
    assert_clean(page)


def test_tooltip_on_hover_and_keyboard_focus(page: object, site_dir: Path) -> None:
    shard, row = unit_data(site_dir, "mlp", 1, 7)
    acts = decode_activations(row["ex"]["top"][0][4])
    page.goto(unit_url(site_dir, "mlp", 1, 7))  # type: ignore[attr-defined]
    first = page.locator(".ctx").first
    tokens = first.locator(":scope > b")
    tokens.nth(2).hover()
    text = tooltip(page)
    assert text.startswith("'") and shown_activation(text) == pytest.approx(acts[2], rel=1e-9)

    # Keyboard: Tab reaches the first example's max token, arrows move along the context.
    page.mouse.move(1, 1)
    page.locator("body").focus()
    for _ in range(60):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.matches('.ctx > b')"):
            break
    assert page.evaluate("document.activeElement.matches('.ctx > b.m')")
    index = page.evaluate("[...document.activeElement.parentElement.children].indexOf(document.activeElement)")
    text = tooltip(page)
    assert shown_activation(text) == pytest.approx(acts[index], rel=1e-9) and "100% of max" in text
    assert page.evaluate("document.activeElement.getAttribute('aria-describedby')") == "tip"
    page.keyboard.press("ArrowLeft")
    assert page.evaluate("[...document.activeElement.parentElement.children].indexOf(document.activeElement)") == \
        index - 1
    assert shown_activation(tooltip(page)) == pytest.approx(acts[index - 1], rel=1e-9)
    page.keyboard.press("Escape")
    assert page.locator("#tip").is_hidden()
    page.keyboard.press("n")  # next unit
    page.wait_for_url(re.compile(r"unit\.html#8$"))
    expect(page.locator("h1")).to_have_text("Neuron 8")
    page.keyboard.press("j")
    page.wait_for_url(re.compile(r"unit\.html#9$"))
    expect(page.locator("h1")).to_have_text("Neuron 9")
    page.keyboard.press("k")
    expect(page.locator("h1")).to_have_text("Neuron 8")
    page.keyboard.press("k")
    page.wait_for_url(re.compile(r"unit\.html#7$"))
    expect(page.locator("h1")).to_have_text("Neuron 7")
    page.keyboard.press("u")
    page.wait_for_url(re.compile(r"/mlp/1/index\.html$"))
    assert_clean(page)


@pytest.mark.parametrize("raw,expected", [
    ("<script>alert(1)</script>", "'<script>alert(1)</script>'"),
    ('"><img src=x onerror=alert(1)>', "'\"><img src=x onerror=alert(1)>'"),
    ("a\x00b", "'a\\x00b'"),
    ("\u202eevil", "'\\u202eevil'"),
    ("  ", "'  '"),
    ("\n\n", "'\\n\\n'"),
    ("\t", "'\\t'"),
])
def test_tooltip_shows_raw_tokens(page: object, site_dir: Path, raw: str, expected: str) -> None:
    """Hostile and blank tokens hovered: the tooltip shows them like repr, as text, and nothing runs."""
    for layer in (0, 1):
        for unit in range(50):
            shard, row = unit_data(site_dir, "mlp", layer, unit)
            for ex in row["ex"].get("top", []):
                ctx = shard["ctx"][ex[0]]
                first = ex[1] - ctx[2]
                indices = context_token_indices(shard, ex[0])
                shown = [shard["toks"][t] for t in indices[first:first + len(decode_activations(ex[4]))]]
                if raw in shown:
                    page.goto(unit_url(site_dir, "mlp", layer, unit))  # type: ignore[attr-defined]
                    example = row["ex"]["top"].index(ex)
                    page.locator("#top .ctx").nth(example).locator(":scope > b").nth(shown.index(raw)).hover()
                    assert tooltip(page).splitlines()[0] == expected
                    assert_clean(page)
                    return
    pytest.fail(f"no example shows {raw!r}")


def test_tooltip_in_every_kind_of_example(page: object, site_dir: Path) -> None:
    """Hovering a token in a quantile sample, a random sample or a bottom example shows its activation; bottom
    examples are relative to the unit's min."""
    _, row = unit_data(site_dir, "sae:res", 1, 0)
    page.goto(unit_url(site_dir, "sae-res", 1, 0))  # type: ignore[attr-defined]
    for section, kind in (("quantiles", "quantile"), ("random", "random")):
        ex = row["ex"][kind][0]
        acts = decode_activations(ex[4])
        marked = page.locator(f"#{section} .ctx").first.locator(":scope > b.m")
        marked.hover()
        text = tooltip(page)
        assert shown_activation(text) == pytest.approx(acts[ex[2] - ex[1]], rel=1e-9) and "% of max" in text
    page.goto(unit_url(site_dir, "resid", 1, 0))
    page.locator("#bottom .ctx > b.m").first.hover()
    text = tooltip(page)
    assert shown_activation(text) < 0 and "100% of min" in text
    assert_clean(page)


def test_feature_page_histogram_and_logits(page: object, site_dir: Path) -> None:
    """A dictionary feature's page under the CSP: the histogram is drawn and coloured by the stylesheet, each
    bar has its title, the logit tables show the tokens as text; no error, no CSP violation."""
    page.goto(unit_url(site_dir, "sae-res", 1, 0))  # type: ignore[attr-defined]
    svg = page.locator("#histogram svg")
    box = svg.bounding_box()
    assert box and box["width"] > 300 and box["height"] > 60
    bars = svg.locator("rect")
    assert bars.count() > 5 and bars.count() == svg.locator("rect > title").count()
    assert page.evaluate("getComputedStyle(document.querySelector('#histogram .hp rect')).fill") != "rgb(0, 0, 0)"
    assert svg.locator("rect > title").first.text_content().startswith("exactly 0: ")
    promoted = page.locator("#logits table").first.locator("tbody tr td:first-child").all_inner_texts()
    assert promoted[0] == "<script>alert(1)</script>" and len(promoted) == 10
    page.get_by_role("link", name="Quantile intervals").click()
    assert page.url.endswith("#0/quantiles")
    # the hashchange handler scrolls after the click has returned: wait for it rather than race it (polled from
    # here: wait_for_function evaluates a string, which the page's CSP forbids)
    deadline = time.monotonic() + 5
    while page.evaluate("document.getElementById('quantiles').getBoundingClientRect().top") >= 50:
        assert time.monotonic() < deadline, "the quantiles section was not scrolled to"
        page.wait_for_timeout(50)
    sql = page.locator("pre.sql").inner_text()
    assert "AND source = 'sae:res' AND layer = 1 AND unit = 0" in sql and "'Tiny \"LM\" <b>v1</b>/../x'" in sql
    with page.expect_download() as download:
        page.get_by_role("link", name=re.compile("Download this unit")).click()
    data = json.loads(Path(download.value.path()).read_text())
    assert data["format"] == "featureatlas.page-unit" and data["unit"] == 0 and data["source"] == "sae:res"
    assert len(data["logits"]["top"]) == 10 and data["examples"][0]["kind"] == "top"
    assert_clean(page)


def test_missing_unit_says_so(page: object, site_dir: Path) -> None:
    page.goto(unit_url(site_dir, "mlp", 1, 4000))  # type: ignore[attr-defined]
    assert "has no unit 4000" in page.locator("#unit").inner_text()
    page.problems.clear()  # the missing data file is a failed script load, reported as such on the console


def test_sort_by_largest_magnitude(page: object, site_dir: Path) -> None:
    page.goto(next(site_dir.glob("*/resid/1/index.html")).as_uri())  # type: ignore[attr-defined]
    page.get_by_role("button", name="Max |act|").click()
    assert page.locator("#units tbody tr td:first-child").first.inner_text() == "9"  # the outlier dimension
    page.locator("body").focus()
    page.keyboard.press("j")
    assert page.evaluate("document.activeElement.textContent") == "9"
    page.keyboard.press("j")
    assert page.evaluate("document.activeElement.textContent") != "9"
    assert_clean(page)


@pytest.mark.parametrize("query,first", [("L1 N7", "Neuron 7"), ("1/7", "Neuron 7"), ("resid/1/9", "Dimension 9"),
                                          ("sae:res 5", "Feature 5"), ("res 1 5", "Feature 5")])
def test_search_by_address(page: object, site_dir: Path, query: str, first: str) -> None:
    page.goto((site_dir / "index.html").as_uri())  # type: ignore[attr-defined]
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.type(query)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"search\.html\?q="))
    results = page.locator("#results .results").first
    results.wait_for()
    assert results.locator("h2").inner_text().startswith("Unit address")
    link = results.locator(".hits a").first
    assert link.inner_text() == first
    assert results.locator(".act").first.inner_text().startswith("max ")
    link.click()
    expect(page.locator("h1")).to_have_text(first)
    assert_clean(page)


def test_search_by_token_lists_units_that_peak_on_it(page: object, site_dir: Path) -> None:
    token = "<script>alert(1)</script>"
    page.goto((site_dir / "search.html").as_uri() + "?q=" + urllib.parse.quote(token))  # type: ignore
    section = page.locator("#results .results").first
    section.wait_for()
    assert section.locator("h2").inner_text().startswith("Top examples peak on \u201c<script>")
    hits = section.locator(".hits > li")
    assert hits.count() >= 1
    # each hit's unit really peaks on the token in one of its top examples
    link = hits.first.locator("a").first.get_attribute("href")
    match = re.search(r"/([^/]+)/(\d+)/unit\.html#(\d+)$", link)
    folder, layer, unit = match.group(1), int(match.group(2)), int(match.group(3))
    shard, row = unit_data(site_dir, {"sae-res": "sae:res"}.get(folder, folder), layer, unit)
    peaks = [shard["toks"][context_token_indices(shard, ex[0])[ex[2] - shard["ctx"][ex[0]][2]]]
             for ex in row["ex"]["top"]]
    assert token in peaks
    page.fill("#q", "zzzz-nothing")
    page.locator("#search-status").filter(has_text="Nothing found").wait_for()
    assert_clean(page)


def test_nothing_injected_runs_and_screenshots(page: object, site_dir: Path) -> None:
    for path in sorted(site_dir.rglob("index.html")):
        page.goto(path.as_uri())  # type: ignore[attr-defined]
        assert page.locator("img, iframe, textarea, object, embed").count() == 0
        scripts = page.evaluate("[...document.scripts].map(s => s.getAttribute('src'))")
        expected = ["core.js", "table.js", "keys.js"] if path.parent != site_dir else ["core.js", "keys.js"]
        assert all(re.fullmatch(r"(\.\./)*static/\w+\.js", src or "") for src in scripts), scripts  # none inline
        assert [src.rsplit("/", 1)[1] for src in scripts] == expected
    for source, layer in (("mlp", 0), ("mlp", 1), ("resid", 1), ("sae-res", 1)):
        for unit in range(0, 50, 7):
            page.goto(unit_url(site_dir, source, layer, unit))
            page.locator("#stats").wait_for()
            assert page.locator("img, iframe, textarea, object, embed").count() == 0
    assert_clean(page)

    SHOTS.mkdir(parents=True, exist_ok=True)
    for name, (source, unit) in (("feature", ("sae-res", 0)), ("resid", ("resid", 9))):
        page.emulate_media(color_scheme="light")
        page.set_viewport_size({"width": 1100, "height": 900})
        page.goto(unit_url(site_dir, source, 1, unit))
        page.locator("#quantiles .ctx > b.m").first.hover()
        tooltip(page)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
        page.emulate_media(color_scheme="dark")
        page.screenshot(path=str(SHOTS / f"{name}-dark.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 800})
        page.screenshot(path=str(SHOTS / f"{name}-narrow.png"))
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")  # no sideways scroll
    page.goto((site_dir / "search.html").as_uri() + "?q=the")
    page.locator("#results .results").first.wait_for()
    page.screenshot(path=str(SHOTS / "search-narrow.png"))
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert_clean(page)


def serious_violations(page: object) -> list[str]:
    """axe-core's serious and critical findings on the current page (its bundled copy: no network)."""
    from axe_playwright_python.sync_playwright import Axe

    results = Axe().run(page).response
    return [f"{v['id']} ({v['impact']}): {len(v['nodes'])} nodes, e.g. {v['nodes'][0]['target']}"
            for v in results["violations"] if v["impact"] in ("serious", "critical")]


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_accessibility(page: object, site_dir: Path, scheme: str) -> None:
    """No serious or critical axe-core violation on the index, layer, unit and search pages."""
    pytest.importorskip("axe_playwright_python")
    page.emulate_media(color_scheme=scheme)  # type: ignore[attr-defined]
    found = {}
    for name, url in (("index", (site_dir / "index.html").as_uri()),
                      ("layer", next(site_dir.glob("*/resid/1/index.html")).as_uri()),
                      ("unit", unit_url(site_dir, "resid", 1, 9)), ("feature", unit_url(site_dir, "sae-res", 1, 0)),
                      ("search", (site_dir / "search.html").as_uri() + "?q=the")):
        page.goto(url)  # type: ignore[attr-defined]
        page.wait_for_load_state("load")
        if name in ("unit", "feature"):
            page.locator("#stats").wait_for()
        if name == "search":
            page.locator("#results .results").first.wait_for()
        found[name] = serious_violations(page)
    assert found == {name: [] for name in found}, found


def test_served_over_http_like_a_static_host(page: object, site_dir: Path) -> None:
    """The same site from `featureatlas serve` (CSP as a header too): index, layer, unit, search, no problem."""
    import threading

    from featureatlas.serve.server import make_server

    server = make_server(site_dir, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    page.problems.clear()  # type: ignore[attr-defined]
    page.on("request", lambda r: None)  # type: ignore[attr-defined]
    try:
        page.goto(base + "index.html")  # type: ignore[attr-defined]
        page.get_by_role("link", name=re.compile(r"^Layer 1\b")).first.click()
        page.get_by_role("link", name="7", exact=True).click()
        expect(page.locator("h1")).to_have_text("Neuron 7")
        assert page.locator("#top .ctx").count() > 0
        page.fill("#q", "resid/1/9")
        page.keyboard.press("Enter")
        expect(page.locator("#results .hits a").first).to_have_text("Dimension 9")
        outside = [url for url in page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
                   if not url.startswith(base)]
        assert outside == []
    finally:
        server.shutdown()
        server.server_close()
    problems = [p for p in page.problems if not p.startswith(base)]  # type: ignore[attr-defined]
    assert problems == [] and page.evaluate("window.__problems") == []


def test_without_javascript_the_layer_pages_still_list_units(browser: object, site_dir: Path) -> None:
    context = browser.new_context(java_script_enabled=False)  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto(next(site_dir.glob("*/mlp/1/index.html")).as_uri())
    assert page.locator("#units tbody tr").count() == 50
    assert page.locator("#units tbody tr").nth(7).locator("mark").count() == 1  # the snippet, max token marked
    page.goto(unit_url(site_dir, "mlp", 1, 7))
    assert "the layer page" in page.locator("noscript").first.text_content()
    context.close()


def test_hostile_explanations_render_as_text(page: object, tmp_path: Path, store_path: Path) -> None:
    """An explanation full of markup is shown as text on its unit page, its layer page and in search results."""
    from featureatlas.annotate.explanations import annotate
    from featureatlas.build.site import build_site

    store = tmp_path / "store.duckdb"
    store.write_bytes(store_path.read_bytes())
    hostile = '"><img src=x onerror=alert(1)> <script>alert(2)</script> javascript:alert(3) \u202eevil'
    notes = tmp_path / "notes.jsonl"
    notes.write_text(json.dumps({"unit": "mlp/1/7", "text": hostile, "author": "<b>mallory</b>"}) + "\n"
                     + "".join(json.dumps({"unit": "mlp/1/8", "text": "commas", "author": "explainer", "score": score,
                                           "score_kind": kind}) + "\n"
                               for kind, score in (("detection", 0.75), ("fuzzing <i>x</i>", 0.5))))
    annotate(store, notes)
    site = tmp_path / "site"
    build_site(store, site, workers=1, progress=False)
    page.goto(unit_url(site, "mlp", 1, 7))  # type: ignore[attr-defined]
    explanation = page.locator("#explanation li")
    expect(explanation).to_contain_text('"><img src=x onerror=alert(1)> <script>alert(2)</script>')
    assert "\\u202eevil" in explanation.inner_text() and "<b>mallory</b>" in explanation.inner_text()
    page.goto(unit_url(site, "mlp", 1, 8))  # type: ignore[attr-defined]
    scored = page.locator("#explanation li")  # one text, two scores: one row, each score labelled
    expect(scored).to_have_count(1)
    expect(scored).to_contain_text("commas \u2014 detection 0.75, fuzzing <i>x</i> 0.5, explainer")
    page.goto(next(site.glob("*/mlp/1/index.html")).as_uri())
    assert "<img src=x" in page.locator("#units tbody tr").nth(7).inner_text()
    page.goto((site / "search.html").as_uri() + "?q=onerror")
    result = page.locator("#results .hits > li").first
    expect(result.locator("a").first).to_have_text("Neuron 7")
    assert "<script>alert(2)</script>" in result.locator(".expl").inner_text()
    assert page.locator("img, script:not([src])").count() == 0
    assert_clean(page)
