"""Debian's chromium driven by Playwright for the browser tests: how it is launched, the script every page gets
first (it records errors, CSP violations and any sign that store text ran as code), and the checks on a page.
The `browser` and `page` fixtures (tests/conftest.py) use these."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from featureatlas.net import is_loopback

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path("/tmp/featureatlas-shots")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--no-first-run"]
WATCH = """
window.__problems = [];
window.addEventListener('error', e => window.__problems.push('error: ' + e.message));
document.addEventListener('securitypolicyviolation',
    e => window.__problems.push('csp: ' + e.violatedDirective + ' ' + e.blockedURI));
for (const name of ['alert', 'confirm', 'prompt']) {
  window[name] = function () { window.__problems.push(name + ' called'); };
}
"""


def require_browser() -> None:
    """Skip (fail, with FEATUREATLAS_REQUIRE_BROWSER=1) when Playwright or Debian's chromium is missing."""
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


def launched() -> Iterator[object]:
    """A headless chromium for the length of the generator."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield browser
        browser.close()


def watched_page(browser: object) -> Iterator[object]:
    """A fresh page whose console errors, page errors, dialogs and requests leaving the machine (anything but
    files, data and `featureatlas serve` on a loopback address) land in page.problems."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    page.add_init_script(WATCH)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: None if _local(r.url) else problems.append(r.url))
    page.problems = problems
    yield page
    context.close()


def _local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("file", "data") or (parts.scheme == "http" and is_loopback(parts.hostname or ""))


def expect(locator: object) -> object:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def assert_clean(page: object) -> None:
    """No console errors, page errors, dialogs, non-local requests, CSP violations or injected calls."""
    in_page = page.evaluate("window.__problems")  # type: ignore[attr-defined]
    assert page.problems == [] and in_page == [], page.problems + in_page  # type: ignore[attr-defined]
