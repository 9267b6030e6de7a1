"""Never lose work: a finished store is never replaced silently, and a harvest killed outright (SIGKILL, at
any moment) resumes from its last checkpoint into the store an uninterrupted run writes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from featureatlas.cli import main

from helpers.tiny_models import save_tiny_model, write_corpus

pytestmark = pytest.mark.model

TIMING = {"started_at", "finished_at", "tokens_per_second"}  # when and how fast: the only columns that may differ


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    model, corpus = save_tiny_model("llama", root / "model"), write_corpus(root / "corpus")
    big = root / "big.txt"  # long enough that a run takes a few seconds
    big.write_text((corpus / "a.txt").read_text() * 3 + (corpus / "d.txt").read_text() * 2)
    return model, big


def harvest_argv(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["harvest", "--model", str(model), "--corpus", str(corpus), "--out", str(out), "--device", "cpu",
            "--resid", "--top-k", "4", "--batch-size", "1", "--compile", "off", *extra]


def store_rows(path: Path) -> dict[str, list]:
    """Every public view's rows, sorted; the run's timing columns left out."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = {}
        for view in ("runs", "sources", "units", "statistics", "histograms", "examples", "logit_effects", "contexts",
                     "documents"):
            names = [d[0] for d in con.execute(f"SELECT * FROM {view} LIMIT 0").description]
            keep = ", ".join(f'"{n}"' for n in names if n not in TIMING)
            rows[view] = sorted(con.execute(f"SELECT {keep} FROM {view}").fetchall(), key=repr)
        return rows
    finally:
        con.close()


def test_a_finished_store_is_never_replaced_silently(tiny, tmp_path: Path, capsys) -> None:
    model, corpus = tiny
    out = tmp_path / "s.duckdb"
    assert main(harvest_argv(model, corpus, out, "--tokens", "200")) == 0
    before = out.read_bytes()
    assert main(harvest_argv(model, corpus, out, "--tokens", "100")) == 2
    assert "s.duckdb: a store is already there; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(harvest_argv(model, corpus, out, "--tokens", "100", "--overwrite")) == 0
    assert out.read_bytes() != before


def test_resume_needs_a_checkpoint_and_the_same_options(tiny, tmp_path: Path, capsys) -> None:
    model, corpus = tiny
    out = tmp_path / "s.duckdb"
    assert main(harvest_argv(model, corpus, out, "--resume")) == 2
    assert "s.duckdb.checkpoint: no checkpoint to resume from" in capsys.readouterr().err
    # a checkpoint written by a run that then failed: its options must match
    from featureatlas.harvest import run as run_module
    real = run_module._write_contexts

    def fail(*args: object) -> None:
        raise RuntimeError("disk full")

    run_module._write_contexts = fail
    try:
        with pytest.raises(RuntimeError):
            main(harvest_argv(model, corpus, out, "--tokens", "300", "--checkpoint-every", "100"))
    finally:
        run_module._write_contexts = real
    assert (tmp_path / "s.duckdb.checkpoint").is_file() and not out.exists()
    assert main(harvest_argv(model, corpus, out, "--tokens", "300", "--top-k", "5", "--resume")) == 2
    assert "was written with --top-k 4, not 5" in capsys.readouterr().err
    assert main(harvest_argv(model, corpus, out, "--tokens", "300", "--resume")) == 0
    assert out.is_file() and not (tmp_path / "s.duckdb.checkpoint").exists()


@pytest.fixture(scope="module")
def whole(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """The uninterrupted run's store."""
    out = tmp_path_factory.mktemp("whole") / "whole.duckdb"
    assert main(harvest_argv(*tiny, out)) == 0
    return store_rows(out)


@pytest.mark.parametrize("kill_after", [1, 3])  # checkpoints written before the kill
def test_resume_after_kill_9_equals_an_uninterrupted_run(tiny, whole, tmp_path: Path, kill_after: int) -> None:
    model, corpus = tiny

    out = tmp_path / "s.duckdb"
    checkpoint = tmp_path / "s.duckdb.checkpoint"
    argv = [sys.executable, "-m", "featureatlas", *harvest_argv(model, corpus, out, "--checkpoint-every", "60")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen, last, deadline = 0, None, time.time() + 120
    while seen < kill_after and time.time() < deadline and proc.poll() is None:
        stamp = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
        if stamp is not None and stamp != last:
            seen, last = seen + 1, stamp
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: make the corpus longer"
    assert not out.exists() and checkpoint.is_file()

    assert main(harvest_argv(model, corpus, out, "--checkpoint-every", "60", "--resume")) == 0
    assert store_rows(out) == whole
    assert not checkpoint.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s.duckdb"]
