"""`featureatlas verify`: a fresh harvest checks out bit for bit; tampering and missing dictionaries are caught."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import duckdb
import pytest
import torch

from featureatlas.cli import main
from featureatlas.harvest.verify import VerifyConfig, default_rtol, sample_examples
from featureatlas.store.encoding import ROUNDING, rounding_bound

from helpers.tiny_models import harvest_small_store

ALL = "100000"  # --sample larger than the store: every example is checked


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A llama store (signed neurons: every example kind) of neurons, residual dims and SAE features; the SAE."""
    store, _, sae = harvest_small_store(tmp_path_factory.mktemp("verify"), logits=0)
    return store, sae


def verify(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main(["verify", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def copy_of(store: Path, tmp_path: Path) -> Path:
    shutil.copy(store, tmp_path / "copy.duckdb")
    return tmp_path / "copy.duckdb"


@pytest.mark.model
def test_fresh_harvest_verifies_clean(harvested, capsys) -> None:
    store, _ = harvested
    code, out, _ = verify(capsys, store)
    assert code == 0 and out.strip() == "verified 200 examples of 3 sources: all match", out
    code, out, _ = verify(capsys, store, "--sample", ALL, "--json")
    report = json.loads(out)
    n_examples = duckdb.connect(str(store), read_only=True).execute("SELECT count(*) FROM examples").fetchone()[0]
    assert code == 0 and report["ok"] and report["mismatches"] == []
    assert report["n_examples"] == n_examples and report["n_sources"] == 3
    # float32 on CPU, in the harvest's own batch layout: the same bits (rounded as the store rounds them), not just
    # within tolerance; the differences are the store's 16-bit rounding alone
    assert report["n_exact"] == n_examples and 0.0 < report["max_relative_diff"] <= ROUNDING
    assert report["rtol"] == {"model": 1e-5} and report["n_units_counted"] == 3 * 48 + 32 + 40


@pytest.mark.model
def test_sample_is_seeded_and_spread_over_sources_kinds_and_units(harvested) -> None:
    store, _ = harvested
    con = duckdb.connect(str(store), read_only=True)
    first, again, other = (sample_examples(con, 60, seed) for seed in (0, 0, 1))
    assert first == again and first != other and len(set(first)) == 60
    by_source = {s: sum(k[1] == s for k in first) for s in ("mlp", "resid", "sae:res1")}
    assert all(n == 20 for n in by_source.values()), by_source  # evenly across sources, whatever their size
    assert {k[3] for k in first} == {"top", "bottom", "quantile", "random"}
    assert len({(k[1], k[2], k[4]) for k in first}) > 40  # many units, not a few units' every example


@pytest.mark.model
def test_tampered_store_is_caught_and_the_units_named(harvested, tmp_path: Path, capsys) -> None:
    store, _ = harvested
    copy = copy_of(store, tmp_path)
    con = duckdb.connect(str(copy))
    # 1. one token of one neuron's top example, away from its max: only the activations differ (kept exactly, as
    # the store keeps an example its grid cannot hold)
    acts, position = con.execute("SELECT activations, max_position FROM examples WHERE source = 'mlp' AND "
                                 "layer = 1 AND unit = 7 AND example_kind = 'top' AND rank = 2").fetchone()
    at = 2 if position != 2 else 3
    acts[at] -= 0.25
    con.execute("UPDATE t_examples SET activations_q = NULL, activations_levels = NULL, activations_exact = ? "
                "WHERE source = 'mlp' AND layer = 1 AND unit = 7 AND example_kind = 'top' AND rank = 2", [acts])
    # 2. an SAE feature's example pointing at another position than its max
    con.execute("UPDATE t_examples SET max_position = max_position + 1 WHERE source = 'sae:res1' AND "
                "unit = (SELECT min(unit) FROM t_examples WHERE source = 'sae:res1') AND example_kind = 'top' "
                "AND rank = 1")
    # 3. a residual dimension that claims to have counted fewer tokens than the run
    con.execute("UPDATE t_units SET n_tokens = n_tokens - 1 WHERE source = 'resid' AND unit = 5")
    sae_unit = con.execute("SELECT min(unit) FROM t_examples WHERE source = 'sae:res1'").fetchone()[0]
    con.close()

    code, out, _ = verify(capsys, copy, "--sample", ALL)
    lines = out.strip().splitlines()
    assert code == 1 and lines[0].endswith(": 3 mismatches"), out
    header, *rows = lines[1:]
    assert header.split()[:6] == ["source", "layer", "unit", "kind", "rank", "max"]
    named = {tuple(r.split()[:5]) for r in rows}
    assert named == {("resid", "1", "5", "statistics", "-"), ("mlp", "1", "7", "top", "2"),
                     ("sae:res1", "1", str(sae_unit), "top", "1")}, out
    assert any(f"position {at}" in r and "stored" in r and "recomputed" in r for r in rows if r.startswith("mlp"))

    code, out, _ = verify(capsys, copy, "--sample", ALL, "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    checks = {(m["source"], m["unit"]): m["checks"] for m in report["mismatches"]}
    assert checks == {("mlp", 7): ["activations"], ("sae:res1", sae_unit): ["max_position"],
                      ("resid", 5): ["n_tokens"]}
    mlp = next(m for m in report["mismatches"] if m["source"] == "mlp")
    rounding = rounding_bound(max(abs(a) for a in acts))  # the store's rounding of the untouched value
    assert mlp["position"] == at and mlp["max_abs_diff"] == pytest.approx(0.25, rel=1e-5, abs=rounding)


@pytest.mark.model
def test_gone_dictionary_gives_one_line_and_sae_points_at_its_new_place(harvested, tmp_path: Path, capsys) -> None:
    store, sae = harvested
    copy = copy_of(store, tmp_path)
    gone = tmp_path / "moved-away" / "sae"
    con = duckdb.connect(str(copy))
    con.execute("UPDATE t_sources SET dictionary_path = ? WHERE source = 'sae:res1'", [str(gone)])
    con.close()
    code, out, err = verify(capsys, copy)
    assert code == 2 and out == ""
    lines = [line for line in err.strip().splitlines() if not line.startswith("verify: ")]  # a progress bar
    assert lines == [f"featureatlas verify: error: source sae:res1 (layer 1): its dictionary "
                     f"folder {gone} is gone; pass --sae res1=PATH with the folder's new place"]
    code, out, _ = verify(capsys, copy, "--sae", f"res1={sae}", "--sample", "50")
    assert code == 0 and out.strip() == "verified 50 examples of 3 sources: all match"
    code, _, err = verify(capsys, store, "--sae", f"other={sae}")
    assert code == 2 and "gives source sae:other (layer 1), which this store does not hold" in err


def test_default_tolerance() -> None:
    assert default_rtol(torch.float32) == 1e-5
    assert default_rtol(torch.bfloat16) == 2 * 2.0 ** -7
    assert default_rtol(torch.float16) == 2 * 2.0 ** -10


def test_every_setting_carries_its_help() -> None:
    """The command line's options are made from these fields: each states its default and help once, here."""
    assert [f.name for f in fields(VerifyConfig) if not f.metadata.get("help")] == []
    assert VerifyConfig(Path("s.duckdb")).sample == 200 and VerifyConfig(Path("s.duckdb")).saes == []
