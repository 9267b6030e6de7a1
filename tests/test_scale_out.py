"""Scale out: shards of one harvest (`--shard I/N` jobs, or torchrun's ranks) merge into the store one process
writes; catalogues of different models combine; stores that cannot be merged are refused, naming why."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from featureatlas.build.site import build_site
from featureatlas.cli import main

from helpers.stores import assert_same_store
from helpers.tiny_models import save_tiny_model, write_corpus

pytestmark = pytest.mark.model

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    corpus = write_corpus(root / "corpus")
    return save_tiny_model("llama", root / "model"), corpus, root


def argv(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["harvest", "--model", str(model), "--corpus", str(corpus), "--out", str(out), "--device", "cpu",
            "--resid", "1", "--layers", "0,2", "--top-k", "3", "--batch-size", "3", "--compile", "off", *extra]


@pytest.fixture(scope="module")
def whole(tiny) -> Path:
    model, corpus, root = tiny
    out = root / "whole.duckdb"
    assert main(argv(model, corpus, out)) == 0
    return out


def test_shards_merge_into_the_single_run(tiny, whole: Path, tmp_path: Path, capsys) -> None:
    model, corpus, _ = tiny
    shards = [tmp_path / f"shard{i}.duckdb" for i in range(3)]
    for i, shard in enumerate(shards):
        assert main(argv(model, corpus, shard, "--shard", f"{i}/3")) == 0
    out = tmp_path / "merged.duckdb"
    assert main(["merge", *map(str, shards), "--out", str(out)]) == 0
    assert "merged 3 stores into 1 run(s)" in capsys.readouterr().out
    assert_same_store(out, whole)
    assert main(["merge", *map(str, shards), "--out", str(out)]) == 2  # never replaced silently
    assert "a store is already there; pass --overwrite" in capsys.readouterr().err


def test_merge_refuses_stores_it_cannot_merge(tiny, whole: Path, tmp_path: Path, capsys) -> None:
    model, corpus, _ = tiny
    other = tmp_path / "other.duckdb"
    assert main(argv(model, corpus, other, "--shard", "1/2", "--top-k", "4")) == 0
    first = tmp_path / "first.duckdb"
    assert main(argv(model, corpus, first, "--shard", "0/2")) == 0
    assert main(["merge", str(first), str(other), "--out", str(tmp_path / "m.duckdb")]) == 2
    assert "differ in --top-k (3 vs 4)" in capsys.readouterr().err
    assert main(["merge", str(first), str(first), "--out", str(tmp_path / "m.duckdb")]) == 2
    assert "is the same shard 0/2" in capsys.readouterr().err
    assert not (tmp_path / "m.duckdb").exists()


def test_catalogues_of_two_models_combine(tiny, whole: Path, tmp_path: Path) -> None:
    _, corpus, root = tiny
    gpt2 = save_tiny_model("gpt2", root / "gpt2")
    second = tmp_path / "gpt2.duckdb"
    assert main(argv(gpt2, corpus, second, "--layers", "0")) == 0
    out = tmp_path / "both.duckdb"
    assert main(["merge", str(whole), str(second), "--out", str(out)]) == 0
    con = duckdb.connect(str(out), read_only=True)
    models = con.execute("SELECT DISTINCT model FROM sources ORDER BY 1").fetchall()
    # each model's examples point at its own contexts: ids were shifted where the tokenizations differ
    dangling = con.execute("SELECT count(*) FROM examples e LEFT JOIN contexts c USING (context_id) "
                           "WHERE c.context_id IS NULL").fetchall()[0][0]
    n_runs = con.execute("SELECT count(*) FROM runs").fetchall()[0][0]
    con.close()
    assert len(models) == 2 and dangling == 0 and n_runs == 2
    summary = build_site(out, tmp_path / "site", workers=1, progress=False)
    assert summary.units > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_write_the_single_run(tiny, whole: Path, tmp_path: Path) -> None:
    model, corpus, _ = tiny
    out = tmp_path / "dist.duckdb"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                             "--master-port", str(_free_port()), "-m", "featureatlas", *argv(model, corpus, out)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "harvested" in result.stdout and result.stdout.count("harvested") == 1  # rank 0 reports
    assert_same_store(out, whole)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist.duckdb"]  # shard stores removed
