"""Fixtures shared by the site tests: one synthetic store (helpers/synthetic_store.py) and the site built from it,
a browser and a watched page (helpers/browser.py); and the check that keeps the cost markers (pyproject.toml)
honest for the browser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.browser import launched, watched_page
from helpers.synthetic_store import make_store

# The longest modules first: pytest-xdist hands whole modules to its two processes in collection order, and one
# started last would run on alone while the other process idles.
LONGEST_FIRST = ("test_end_to_end.py", "test_features.py", "test_browser.py", "test_triton_kernels.py",
                 "test_resume.py", "test_site.py", "test_scale_out.py", "test_ablation.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first; and a test that takes a `browser` fixture must carry the browser marker, or
    `make check` would start chromium."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
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
