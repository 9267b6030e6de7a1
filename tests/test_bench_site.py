"""Smoke test of bench/site.py and its store generator at a tiny size: the store is sound and complete, the bench
runs end to end and leaves nothing behind. No timing assertions (the bench's numbers are for people)."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from featureatlas.store.schema import open_store

from helpers.synthetic_store import HOSTILE_TOKENS, LargeStoreSummary, large_source_specs, make_large_store

ROOT = Path(__file__).resolve().parents[1]
UNITS = 300
TOP_K, RANDOM, INTERVALS, PER_INTERVAL, LOGITS = 20, 4, 12, 2, 10  # the CLI's defaults, which the store mimics


@pytest.fixture(scope="module")
def large_store(tmp_path_factory: pytest.TempPathFactory) -> LargeStoreSummary:
    return make_large_store(tmp_path_factory.mktemp("large") / "store.duckdb", UNITS, seed=3, n_contexts=2_000)


def load_bench() -> ModuleType:
    """bench/ is no package, and its site.py must not shadow the standard library's `site`: load it by path."""
    spec = importlib.util.spec_from_file_location("bench_site", ROOT / "bench" / "site.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("units", [3, 7, 300, 2_112, 10_000, 100_000, 123_457])
def test_units_split_across_sources_exactly(units: int) -> None:
    specs = large_source_specs(units)
    assert sum(s.n_units * len(s.layers) for s in specs) == units
    assert [s.kind for s in specs] == ["mlp", "resid", "sae"] and all(s.n_units >= 1 for s in specs)
    assert specs[0].layers == specs[1].layers and specs[1].signed and not specs[0].signed


def test_hundred_thousand_units_look_like_smollm2() -> None:
    mlp, resid, sae = large_source_specs(100_000)
    assert (len(mlp.layers), mlp.n_units, resid.n_units) == (40, 1_520, 570)
    assert (sae.name, sae.layers, sae.n_units) == ("sae:res15", (15,), 16_400)


def test_store_has_the_expected_rows_per_view(large_store: LargeStoreSummary) -> None:
    s = large_store
    live = UNITS - s.dead_features
    resid = s.units["resid"]
    con = open_store(s.path)
    try:
        def one(sql: str) -> tuple:
            return con.execute(sql).fetchone()

        assert dict(con.execute("SELECT source, count(*) FROM units GROUP BY ALL").fetchall()) == s.units
        assert dict(con.execute("SELECT source, count(*) FROM sources GROUP BY ALL").fetchall()) == s.layers
        assert one("SELECT count(*), count(mean), count(std) FROM statistics") == (UNITS, UNITS, UNITS)
        assert one("SELECT count(*), count(token) FROM logit_effects") == (UNITS * 2 * LOGITS,) * 2
        kinds = dict(con.execute("SELECT example_kind, count(*) FROM examples GROUP BY ALL").fetchall())
        assert kinds == {k: n for k, n in s.examples.items() if n}
        assert kinds["top"] == TOP_K * live and kinds["random"] == RANDOM * live and kinds["bottom"] == TOP_K * resid
        assert PER_INTERVAL * INTERVALS // 2 * live <= kinds["quantile"] <= PER_INTERVAL * INTERVALS * live
        bins = one("SELECT count(DISTINCT (source, layer, unit)), count(*) FROM histograms")
        assert bins[0] == UNITS and 20 * UNITS <= bins[1] <= 40 * UNITS  # ~30 non-empty bins a unit
        assert one("SELECT count(*) FROM contexts") == (s.contexts,)
        assert one("SELECT count(*) FROM documents") == (s.documents,)
        assert one("SELECT count(*) FROM runs") == (1,)
        # every example's context is stored, one activation per token, the value where max_position says
        assert one("""SELECT count(*) FROM examples e LEFT JOIN contexts c USING (context_id)
                      WHERE c.tokens IS NULL OR len(e.activations) != len(c.tokens)
                         OR e.activations[e.max_position + 1] != e.max_activation OR e.max_position < 1""") == (0,)
        assert one("""SELECT count(*) FROM units u JOIN examples e USING (model, source, layer, unit)
                      WHERE e.example_kind = 'top' AND e.rank = 1 AND e.max_activation != u.max_activation""") == (0,)
        tokens = {t for (t,) in con.execute("SELECT DISTINCT unnest(tokens) FROM contexts").fetchall()}
        assert {"<script>", '"><img src=x onerror=alert(1)>', "\u202e", "\x00"} <= tokens & set(HOSTILE_TOKENS)
    finally:
        con.close()


def test_generator_is_deterministic(tmp_path: Path) -> None:
    a = make_large_store(tmp_path / "a.duckdb", 40, seed=5, n_contexts=300)
    b = make_large_store(tmp_path / "b.duckdb", 40, seed=5, n_contexts=300)
    rows = []
    for summary in (a, b):
        con = open_store(summary.path)
        rows.append(con.execute("SELECT unit, rank, context_id, activations FROM examples ORDER BY ALL").fetchall())
        con.close()
    assert rows[0] == rows[1] and np.isfinite(np.array([r[3][1] for r in rows[0]])).all()


def test_bench_runs_end_to_end_and_cleans_up(large_store: LargeStoreSummary, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    bench = load_bench()

    reused = bench.main(["--store", str(large_store.path), "--workers", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert reused.units == UNITS and reused.store_seconds is None
    assert reused.site.files > 0 and reused.site.bytes > 0 and reused.site.largest
    assert set(reused.fits) == {host.name for host in bench.HOSTS}
    for text in ("units/s", "bytes per unit", "files per 100 units", "largest file", "GitHub Pages",
                 "Cloudflare Pages", "GitLab Pages"):
        assert text in out
    assert list(scratch.iterdir()) == []  # the temporary site is gone

    site = tmp_path / "kept"
    fresh = bench.main(["--units", "120", "--workers", "1", "--keep", str(site), "--no-progress"])
    assert fresh.units == 120 and fresh.store_seconds is not None and "store: generated" in capsys.readouterr().out
    assert fresh.site.files == sum(1 for p in site.rglob("*") if p.is_file())
    assert list(scratch.iterdir()) == []  # the generated store is gone, the kept site is not
