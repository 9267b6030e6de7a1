"""Logit effects are kept in the featureatlas cache by the hash of what they are computed from: a second harvest of
the same model reads them back (the same table, nothing recomputed), a damaged entry is recomputed, another model
never hits an entry of the first, and the cache switch turns it off."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from featureatlas.harvest import logits, native
from featureatlas.harvest.run import HarvestConfig, harvest
from featureatlas.load.models import model_cache_disabled

from helpers.tiny_models import LAYERS, save_tiny_model, write_corpus

pytestmark = pytest.mark.model


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    native.library()  # loaded from the usual cache first: a fresh one would build it again
    monkeypatch.setenv("FEATUREATLAS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "logits"


def run(model: Path, corpus: Path, out: Path) -> list:
    harvest(HarvestConfig(model=str(model), corpus=corpus, out=out, context_length=8, top_k=2, batch_size=4,
                          tokens=200, dtype="float32", device="cpu", progress=False, resid="all", logits=4))
    with duckdb.connect(str(out), read_only=True) as con:
        return con.execute("SELECT source, layer, unit, polarity, rank, token_id, effect FROM logit_effects "
                           "ORDER BY ALL").fetchall()


def test_a_second_harvest_reads_the_effects_back(tmp_path: Path, cache: Path, monkeypatch) -> None:
    model, corpus = save_tiny_model("llama", tmp_path / "model"), write_corpus(tmp_path / "corpus")
    first = run(model, corpus, tmp_path / "a.duckdb")
    entries = sorted(cache.glob("*.safetensors"))
    assert len(entries) == LAYERS + 1  # each layer's neurons; every layer's residual dimensions share one
    assert first and not list(cache.glob(".*"))  # no temporary file left

    def no_products(*args: object) -> None:
        raise AssertionError("recomputed instead of read from the cache")
    with monkeypatch.context() as patch:
        patch.setattr(logits, "_logits_by_chunk", no_products)
        assert run(model, corpus, tmp_path / "b.duckdb") == first

    for entry in entries:
        entry.write_bytes(b"not a tensor file")
    assert run(model, corpus, tmp_path / "c.duckdb") == first  # recomputed, and written again whole
    with monkeypatch.context() as patch:
        patch.setattr(logits, "_logits_by_chunk", no_products)
        assert run(model, corpus, tmp_path / "d.duckdb") == first

    other = save_tiny_model("llama", tmp_path / "other", seed=5)
    assert run(other, corpus, tmp_path / "e.duckdb") != first
    assert len(list(cache.glob("*.safetensors"))) == 2 * (LAYERS + 1)


def test_the_cache_switch_turns_it_off(tmp_path: Path, cache: Path) -> None:
    model, corpus = save_tiny_model("llama", tmp_path / "model"), write_corpus(tmp_path / "corpus")
    with model_cache_disabled():
        run(model, corpus, tmp_path / "a.duckdb")
    assert not cache.exists()
