"""Writes a store to a temporary file beside the target and renames it into place only when complete."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType

import duckdb
import numpy as np
import pyarrow as pa

from featureatlas.atomic import remove_stale_temps, temp_path_beside
from featureatlas.store.schema import StoreError, create_schema


def check_writable_target(path: Path) -> None:
    """Fail early, before hours of harvesting, when the store could not be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and path.is_dir():
        raise StoreError(f"{path}: is a directory; pass a file name such as {path / 'store.duckdb'}")
    if not parent.is_dir():
        raise StoreError(f"{path}: folder {parent} does not exist; create it or choose another --out")
    if not os.access(parent, os.W_OK):
        raise StoreError(f"{path}: folder {parent} is not writable; choose another --out")


def _ragged(rows: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """Rows of a 2-D array cut to their lengths, as an Arrow list column (no per-row Python loop)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    keep = np.arange(rows.shape[1]) < lengths[:, None]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(rows[keep]))


class StoreWriter:
    """Use as `with StoreWriter(path) as store: ...`; the file appears at `path` only if the block succeeds."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_writable_target(self.path)
        remove_stale_temps(self.path)
        self.temp_path = temp_path_beside(self.path)
        self.temp_path.unlink(missing_ok=True)
        self.con = duckdb.connect(str(self.temp_path))
        create_schema(self.con)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def commit(self) -> None:
        self.con.execute("CHECKPOINT")
        self.con.close()
        os.replace(self.temp_path, self.path)

    def abort(self) -> None:
        self.con.close()
        self.temp_path.unlink(missing_ok=True)
        Path(str(self.temp_path) + ".wal").unlink(missing_ok=True)

    def _insert(self, table: str, columns: dict[str, pa.Array | np.ndarray | list]) -> None:
        arrow_table = pa.table(columns)  # noqa: F841 - read by DuckDB's replacement scan below
        names = ", ".join(columns)
        self.con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM arrow_table")

    def add_run(self, **run: object) -> None:
        run = dict(run)
        run["settings"] = json.dumps(run["settings"])
        run["versions"] = json.dumps(run["versions"])
        names = list(run)
        self.con.execute(f"INSERT INTO t_runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                         [run[n] for n in names])

    def add_source(self, model: str, source: str, layer: int, n_units: int, hook: str) -> None:
        self.con.execute("INSERT INTO t_sources VALUES (?, ?, ?, ?, ?)", [model, source, layer, n_units, hook])

    def add_documents(self, document_ids: np.ndarray, names: list[str], n_tokens: np.ndarray) -> None:
        self._insert("t_documents", {"document_id": np.asarray(document_ids, np.int64), "name": names,
                                     "n_tokens": np.asarray(n_tokens, np.int64)})

    def add_contexts(self, context_ids: np.ndarray, document_ids: np.ndarray, start_tokens: np.ndarray,
                     token_ids: list[list[int]], tokens: list[list[str]]) -> None:
        self._insert("t_contexts", {
            "context_id": np.asarray(context_ids, np.int64),
            "document_id": np.asarray(document_ids, np.int64),
            "start_token": np.asarray(start_tokens, np.int32),
            "token_ids": pa.array(token_ids, type=pa.list_(pa.int32())),
            "tokens": pa.array(tokens, type=pa.list_(pa.string())),
        })

    def add_unit_examples(self, model: str, source: str, layer: int, values: np.ndarray,
                          context_ids: np.ndarray, positions: np.ndarray, activations: np.ndarray,
                          context_lengths: np.ndarray) -> None:
        """Write one source's units and top-k examples.

        values, context_ids, positions: [units, k], best first; empty slots have context_id -1.
        activations: [units, k, context_length]; context_lengths: [units, k] tokens that are real.
        """
        n_units, k = values.shape
        filled = context_ids >= 0
        n_examples = filled.sum(axis=1)
        max_activation = np.where(n_examples > 0, values[:, 0], np.nan).astype(np.float32)
        self._insert("t_units", {
            "model": pa.array([model] * n_units), "source": pa.array([source] * n_units),
            "layer": np.full(n_units, layer, np.int32), "unit": np.arange(n_units, dtype=np.int32),
            "max_activation": pa.array(max_activation, from_pandas=True), "n_examples": n_examples.astype(np.int32),
        })
        unit_idx, rank_idx = np.nonzero(filled)
        n = len(unit_idx)
        self._insert("t_examples", {
            "model": pa.array([model] * n), "source": pa.array([source] * n),
            "layer": np.full(n, layer, np.int32),
            "unit": unit_idx.astype(np.int32), "rank": (rank_idx + 1).astype(np.int32),
            "context_id": context_ids[filled].astype(np.int64),
            "max_position": positions[filled].astype(np.int32),
            "max_activation": values[filled].astype(np.float32),
            "activations": _ragged(activations[filled].astype(np.float32), context_lengths[filled]),
        })
