"""The site in a real browser, from file:// under its CSP: navigation, tooltips, keyboard, no injected code.

Needs Debian's chromium at /usr/bin/chromium and the playwright Python package (no downloaded browser).
Skipped when either is missing, unless FEATUREATLAS_REQUIRE_BROWSER=1 makes that a failure.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from featureatlas.build.numbers import decode_activations

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path("/tmp/featureatlas-shots")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--no-first-run"]
# Installed before any page script: records errors, CSP violations and any sign that store text ran as code.
WATCH = """
window.__problems = [];
window.addEventListener('error', e => window.__problems.push('error: ' + e.message));
document.addEventListener('securitypolicyviolation',
    e => window.__problems.push('csp: ' + e.violatedDirective + ' ' + e.blockedURI));
for (const name of ['alert', 'confirm', 'prompt']) {
  window[name] = function () { window.__problems.push(name + ' called'); };
}
"""


def _require_browser() -> None:
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "the playwright package is not installed (pip install playwright)"
    if reason is None and not CHROMIUM.is_file():
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("FEATUREATLAS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests required but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    page.add_init_script(WATCH)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: None if r.url.startswith(("file://", "data:")) else problems.append(r.url))
    page.problems = problems
    yield page
    context.close()


def assert_clean(page: object) -> None:
    """No console errors, page errors, dialogs, non-local requests, CSP violations or injected calls."""
    in_page = page.evaluate("window.__problems")  # type: ignore[attr-defined]
    assert page.problems == [] and in_page == [], page.problems + in_page  # type: ignore[attr-defined]


def tooltip(page: object) -> str:
    tip = page.locator("#tip")  # type: ignore[attr-defined]
    tip.wait_for(state="visible", timeout=2000)
    return tip.inner_text()


def shown_activation(text: str) -> float:
    match = re.search(r"activation (\S+)", text)
    assert match, text
    return float(match.group(1))


def test_browse_from_file_url(page: object, site_dir: Path) -> None:
    page.goto((site_dir / "index.html").as_uri())  # type: ignore[attr-defined]
    assert page.evaluate("document.documentElement.classList.contains('js')")  # site.js ran under the CSP
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
    assert page.url.endswith("/mlp/1/7.html")
    assert page.locator("h1").inner_text() == "Neuron 7"
    assert_clean(page)


def test_tooltip_on_hover_and_keyboard_focus(page: object, site_dir: Path) -> None:
    unit = next(site_dir.glob("*/mlp/1/7.html"))
    page.goto(unit.as_uri())  # type: ignore[attr-defined]
    first = page.locator(".ctx").first
    acts = decode_activations(first.get_attribute("data-acts"))

    tokens = first.locator(":scope > b")
    tokens.nth(2).hover()
    text = tooltip(page)
    assert text.startswith("'") and shown_activation(text) == pytest.approx(acts[2], rel=1e-9)

    # Keyboard: Tab reaches the first example's max token, arrows move along the context.
    page.mouse.move(1, 1)
    page.locator("body").focus()
    for _ in range(40):
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
    page.wait_for_url(re.compile(r"/8\.html$"))
    assert_clean(page)


@pytest.mark.parametrize("shown,html,expected", [
    ("<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;", "'<script>alert(1)</script>'"),
    ('"><img src=x onerror=alert(1)>', "&#34;&gt;&lt;img", "'\"><img src=x onerror=alert(1)>'"),
    ("a\\x00b", "a<i>\\x00</i>b", "'a\\x00b'"),
    ("\\u202eevil", "<i>\\u202e</i>evil", "'\\u202eevil'"),
    ("\u00b7\u00b7", "<i>\u00b7\u00b7</i></b>", "'  '"),
    ("\u23ce\u23ce", "<i>\u23ce\n\u23ce\n</i></b>", "'\\n\\n'"),
    ("\u21e5", "<i>\u21e5</i></b>", "'\\t'"),
])
def test_tooltip_shows_raw_tokens(page: object, site_dir: Path, shown: str, html: str, expected: str) -> None:
    """Hostile and blank tokens hovered: the tooltip shows them like repr, as text, and nothing runs."""
    in_context = re.compile(r"<b( [^>]*)?>" + re.escape(html))  # in an example, not only in a logit table
    unit = next(path for path in sorted(site_dir.glob("*/mlp/*/*.html")) if in_context.search(path.read_text()))
    page.goto(unit.as_uri())  # type: ignore[attr-defined]
    token = page.locator(".ctx > b")
    texts = [re.sub(r"\s", "", text) for text in token.all_inner_texts()]
    index = texts.index(re.sub(r"\s", "", shown))
    token.nth(index).hover()
    assert tooltip(page).splitlines()[0] == expected
    assert_clean(page)


def test_tooltip_in_every_kind_of_example(page: object, site_dir: Path) -> None:
    """Hovering a token in a quantile sample, a random sample or a bottom example shows its activation; bottom
    examples are relative to the unit's min."""
    page.goto(next(site_dir.glob("*/sae-res/1/0.html")).as_uri())  # type: ignore[attr-defined]
    for section in ("quantiles", "random"):
        ctx = page.locator(f"#{section} .ctx").first
        acts = decode_activations(ctx.get_attribute("data-acts"))
        marked = ctx.locator(":scope > b.m")
        index = marked.evaluate("el => [...el.parentElement.children].indexOf(el)")
        marked.hover()
        text = tooltip(page)
        assert shown_activation(text) == pytest.approx(acts[index], rel=1e-9) and "% of max" in text
    page.goto(next(site_dir.glob("*/resid/1/0.html")).as_uri())
    page.locator("#bottom .ctx > b.m").first.hover()
    text = tooltip(page)
    assert shown_activation(text) < 0 and "100% of min" in text
    assert_clean(page)


def test_feature_page_histogram_and_logits(page: object, site_dir: Path) -> None:
    """A dictionary feature's page under the CSP: the histogram is drawn and coloured by the stylesheet, each
    bar has its title, the logit tables show the tokens as text; no error, no CSP violation."""
    page.goto(next(site_dir.glob("*/sae-res/1/0.html")).as_uri())  # type: ignore[attr-defined]
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
    assert page.url.endswith("#quantiles")
    assert_clean(page)


def test_sort_by_largest_magnitude(page: object, site_dir: Path) -> None:
    page.goto(next(site_dir.glob("*/resid/1/index.html")).as_uri())  # type: ignore[attr-defined]
    page.get_by_role("button", name="Max |act|").click()
    assert page.locator("#units tbody tr td:first-child").first.inner_text() == "9"  # the outlier dimension
    assert_clean(page)


def test_nothing_injected_runs_and_screenshots(page: object, site_dir: Path) -> None:
    for path in sorted(site_dir.rglob("*.html"))[:30] + sorted(site_dir.glob("*/sae-res/1/*.html"))[:10]:
        page.goto(path.as_uri())  # type: ignore[attr-defined]
        assert page.locator("img, iframe, textarea, object, embed").count() == 0
        assert page.evaluate("document.scripts.length") == 1
    assert_clean(page)

    SHOTS.mkdir(parents=True, exist_ok=True)
    for name, unit in (("feature", "*/sae-res/1/0.html"), ("resid", "*/resid/1/9.html")):
        page.emulate_media(color_scheme="light")
        page.set_viewport_size({"width": 1100, "height": 900})
        page.goto(next(site_dir.glob(unit)).as_uri())
        page.locator("#quantiles .ctx > b.m").first.hover()
        tooltip(page)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
        page.emulate_media(color_scheme="dark")
        page.screenshot(path=str(SHOTS / f"{name}-dark.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 800})
        page.screenshot(path=str(SHOTS / f"{name}-narrow.png"))
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")  # no sideways scroll
    assert_clean(page)
