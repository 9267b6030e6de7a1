"""Fixtures shared by the site tests: one synthetic store (helpers/synthetic_store.py) and the site built from it,
a browser and a watched page (helpers/browser.py); and the check that keeps the cost markers (pyproject.toml)
honest for the browser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.browser import launched, watched_page
from helpers.synthetic_store import make_store


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that takes a `browser` fixture must carry the browser marker, or `make check` would start chromium."""
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()) and item.get_closest_marker("browser") is None:
            raise pytest.UsageError(f"{item.nodeid}: takes the browser fixture; mark it @pytest.mark.browser "
                                    "(a module of them: pytestmark = pytest.mark.browser)")


@pytest.fixture(scope="session")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "store.duckdb")


@pytest.fixture(scope="session")
def site_dir(tmp_path_factory: pytest.TempPathFactory, store_path: Path) -> Path:
    from featureatlas.build.site import build_site

    out = tmp_path_factory.mktemp("site") / "site"
    build_site(store_path, out, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    yield from launched()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    yield from watched_page(browser)
