"""Fixtures shared by the site tests: one synthetic store (helpers/synthetic_store.py) and the site built from it,
a browser and a watched page (helpers/browser.py); and the check that keeps the cost markers (pyproject.toml)
honest for the browser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.browser import launched, watched_page
from helpers.synthetic_store import make_store

# The longest modules first (measured: bench/RESULTS.md, "Fresh clone"), so that neither test process runs the last
# long one alone at the end; pytest-xdist hands whole modules out in this order (the Makefile turns off its own
# reordering by test count).
LONGEST_FIRST = ("test_end_to_end.py", "test_triton_kernels.py", "test_features.py", "test_browser.py",
                 "test_resume.py", "test_scale_out.py", "test_triton_compile.py", "test_site.py", "test_harvest.py",
                 "test_ablation.py", "test_relations_site.py", "test_security_inputs.py", "test_attention.py",
                 "test_cli.py", "test_map.py", "test_export.py", "test_annotate.py", "test_dictionary_formats.py",
                 "test_model_cache.py", "test_steer_serve.py", "test_security_server.py", "test_fuzz_parsers.py")


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
