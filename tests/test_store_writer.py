"""StoreWriter runs its statements on a writer thread: every one lands, in order; a failed one is raised and
leaves no store; an interrupted write leaves nothing behind either."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest

from featureatlas.store.writer import StoreWriter

WIDTH = 8


def _add_batch(store: StoreWriter, unit: int, n: int) -> None:
    acts = np.tile(np.arange(1, WIDTH + 1, dtype=np.float32), (n, 1)) * (unit + 1)
    store.add_examples("m", "mlp", 0, "top", units=np.full(n, unit), ranks=np.arange(1, n + 1),
                       context_ids=np.arange(n) + 100 * unit, positions=np.full(n, WIDTH - 1),
                       values=acts[:, -1], activations=acts, context_lengths=np.full(n, WIDTH))


def test_every_queued_statement_lands_in_order(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with StoreWriter(path) as store:
        units = range(3 * StoreWriter.QUEUED + 1)
        for unit in units:
            _add_batch(store, unit, n=unit + 1)
        # `con` waits for the queue: a read in the middle sees every insert made so far
        assert store.con.execute("SELECT count(*) FROM t_examples").fetchone()[0] == sum(u + 1 for u in units)
        _add_batch(store, 99, n=3)
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute("SELECT unit, rank, context_id, max_activation FROM examples").fetchall()
    finally:
        con.close()
    expected = [(u, r, 100 * u + r - 1, float(WIDTH * (u + 1))) for u in [*units, 99]
                for r in range(1, (u + 1 if u != 99 else 3) + 1)]
    assert rows == expected  # insertion order, as the statements were given


def test_a_failed_statement_is_raised_and_leaves_no_store(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with pytest.raises(duckdb.Error, match="not a layer"):
        with StoreWriter(path) as store:
            store.add_source("m", "mlp", "not a layer", 4, "hook", kind="mlp",  # type: ignore[arg-type]
                             hook_name="h", signed=True)
            for unit in range(4):  # queued after the failure: each fails too, the first error is the one raised
                _add_batch(store, unit, n=2)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(path) as store:
            for unit in range(2 * StoreWriter.QUEUED):
                _add_batch(store, unit, n=50)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
