"""Fixtures for the site tests; the synthetic stores themselves are made in synthetic_store.py (shared with
bench/site.py), whose names are re-exported here for the tests that import them from conftest."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_store import (
    BOS,
    CONTEXTS_SEEN,
    DEAD_FEATURE,
    DOC_NAMES,
    FEW_EXAMPLES,
    LOGIT_VOCAB,
    MISSING_TOKEN_ID,
    MODEL,
    N_LOGITS,
    NASTY_TOKENS,
    NEVER_SEEN,
    ONLY_NEGATIVE,
    PLAIN_TOKENS,
    RESID_OUTLIER,
    SAE_CONFIG,
    SAE_PATH,
    SAMPLES,
    SourceSpec,
    histogram_bin,
    make_store,
    source_specs,
)

__all__ = ["BOS", "CONTEXTS_SEEN", "DEAD_FEATURE", "DOC_NAMES", "FEW_EXAMPLES", "LOGIT_VOCAB", "MISSING_TOKEN_ID",
           "MODEL", "N_LOGITS", "NASTY_TOKENS", "NEVER_SEEN", "ONLY_NEGATIVE", "PLAIN_TOKENS", "RESID_OUTLIER",
           "SAE_CONFIG", "SAE_PATH", "SAMPLES", "SourceSpec", "histogram_bin", "make_store", "source_specs"]


@pytest.fixture(scope="session")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "store.duckdb")


@pytest.fixture(scope="session")
def site_dir(tmp_path_factory: pytest.TempPathFactory, store_path: Path) -> Path:
    from featureatlas.build.site import build_site

    out = tmp_path_factory.mktemp("site") / "site"
    build_site(store_path, out, workers=1, progress=False)
    return out
