"""Sequences longer than the model's positions are refused with one line before any forward pass (past them
GPT-2 indexes outside its position table; on CUDA that device assert poisons the whole process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from featureatlas.cli import main
from featureatlas.harvest.probe import load_prober
from featureatlas.serve.server import probe

from helpers.tiny_models import save_tiny_model, write_corpus

pytestmark = pytest.mark.model

POSITIONS = 128  # tiny_models' configs


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gpt2")
    return save_tiny_model("gpt2", root / "model"), write_corpus(root / "corpus")


def last_error(capsys: pytest.CaptureFixture) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_harvest_refuses_a_context_longer_than_the_positions(gpt2, tmp_path: Path, capsys) -> None:
    model, corpus = gpt2
    out = tmp_path / "s.duckdb"
    code = main(["harvest", "--model", str(model), "--corpus", str(corpus), "--out", str(out), "--device", "cpu",
                 "--context-length", str(POSITIONS + 1)])
    assert code == 2 and f"context_length is {POSITIONS + 1} tokens, but gpt2 reads at most {POSITIONS}" in \
        last_error(capsys)
    assert not out.exists()
    assert main(["harvest", "--model", str(model), "--corpus", str(corpus), "--out", str(out), "--device", "cpu",
                 "--context-length", str(POSITIONS), "--tokens", "300"]) == 0  # the limit itself is fine


def test_probe_and_serve_refuse_a_text_longer_than_the_positions(gpt2, capsys) -> None:
    model, _ = gpt2
    text = "the cat sat on the mat " * 40
    code = main(["probe", "--model", str(model), "--device", "cpu", "--unit", "mlp/0/1", "--plain", text])
    assert code == 2 and f"but gpt2 reads at most {POSITIONS}; probe a shorter text" in last_error(capsys)
    prober = load_prober(str(model), device="cpu")
    with pytest.raises(ValueError, match=f"reads at most {POSITIONS}"):
        probe(prober, {"source": "mlp", "layer": 0, "unit": 1, "text": text})
    with pytest.raises(ValueError, match=f"reads at most {POSITIONS}"):
        probe(prober, {"source": "mlp", "layer": 0, "top": 3, "text": text})
    assert probe(prober, {"source": "mlp", "layer": 0, "unit": 1, "text": "the cat sat"})["tokens"]
