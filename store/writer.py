"""Writes a store to a temporary file beside the target and renames it into place only when complete."""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import duckdb
import numpy as np
import pyarrow as pa

from featureatlas.atomic import durable_replace, remove_stale_temps, temp_path_beside
from featureatlas.errors import setting_name
from featureatlas.store import encoding
from featureatlas.store.connect import safe_connect
from featureatlas.store.schema import StoreError, create_schema


def check_writable_target(path: Path) -> None:
    """Fail early, before hours of harvesting, when the store could not be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and path.is_dir():
        raise StoreError(f"{path}: is a directory; pass a file name such as {path / 'store.duckdb'}")
    if not parent.is_dir():
        raise StoreError(f"{path}: folder {parent} does not exist; create it or choose another {setting_name('out')}")
    if not os.access(parent, os.W_OK):
        raise StoreError(f"{path}: folder {parent} is not writable; choose another {setting_name('out')}")
    probe = temp_path_beside(path, "probe")  # os.access trusts permission bits; /proc, read-only mounts lie
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as err:
        raise StoreError(f"{path}: cannot create files in folder {parent} ({err.strerror}); choose another "
                         f"{setting_name('out')}") from None


class StoreWriter:
    """Use as `with StoreWriter(path) as store: ...`; the file appears at `path` only if the block succeeds.

    Statements run on one writer thread, in the order given: DuckDB appends a batch of examples (its codes, some
    300 million int16 values for a harvest of 80,000 units, one at a time with their statistics) while the
    caller encodes the next batch, instead of after it. At most QUEUED statements wait, so memory stays at a few
    batches. DuckDB gets one core fewer than the machine (a second thread on 2 cores only slows the caller's
    encoding); its configuration is locked (store/connect.py), so that holds to the end. A statement's error is
    raised by a later call."""

    QUEUED = 2

    def __init__(self, path: str | Path, attach: list[Path] | None = None):
        """attach: stores the caller will ATTACH (merge's inputs), the only other files the connection may read;
        then DuckDB keeps every core, for the caller's own statements."""
        self.path = Path(path)
        check_writable_target(self.path)
        remove_stale_temps(self.path)
        self.temp_path = temp_path_beside(self.path)
        self.temp_path.unlink(missing_ok=True)
        threads = None if attach else max(1, (os.cpu_count() or 1) - 1)
        self._con = safe_connect(self.temp_path, threads=threads, readable=attach or ())
        create_schema(self._con)
        self._con.execute("BEGIN TRANSACTION")  # one transaction: no commit (and WAL sync) per insert
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="featureatlas-store")
        self._queued: deque[Future] = deque()

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The connection, once every queued statement has run: for reads, or statements of the caller's own,
        each run to completion before the next add_... call queues more."""
        self.wait()
        return self._con

    def wait(self) -> None:
        """Until every queued statement has run; raises the first one's error."""
        while self._queued:
            self._queued.popleft().result()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def commit(self) -> None:
        try:
            self.wait()
        except BaseException:
            self.abort()
            raise
        self._writer.shutdown()
        self._con.execute("COMMIT")
        self._con.execute("CHECKPOINT")
        self._con.close()
        durable_replace(self.temp_path, self.path)

    def abort(self) -> None:
        self._writer.shutdown(cancel_futures=True)  # a statement already running finishes first
        self._queued.clear()
        self._con.close()
        self.temp_path.unlink(missing_ok=True)
        Path(str(self.temp_path) + ".wal").unlink(missing_ok=True)

    def _execute(self, sql: str, parameters: list | None = None, data: pa.Table | None = None) -> None:
        """Queue one statement for the writer thread (data: an Arrow table the statement reads as `batch`)."""
        self._queued.append(self._writer.submit(self._run, sql, parameters, data))
        while len(self._queued) > self.QUEUED:
            self._queued.popleft().result()

    def _run(self, sql: str, parameters: list | None, data: pa.Table | None) -> None:
        if data is None:
            self._con.execute(sql, parameters)
            return
        self._con.complete()  # a read of the caller's left unfinished would block the registration
        self._con.register("batch", data)  # registered: replacement scans are off with external access
        try:
            self._con.execute(sql, parameters)
        finally:
            self._con.unregister("batch")

    def _insert(self, table: str, columns: dict[str, pa.Array | np.ndarray | list],
                constants: dict[str, object] | None = None) -> None:
        """columns: one value per row; constants: one value for every row (bound as parameters: DuckDB then
        repeats it as a constant vector, where a column of n equal strings costs n conversions)."""
        constants = constants or {}
        names = ", ".join([*constants, *columns])
        values = ", ".join(["?"] * len(constants) + list(columns))
        self._execute(f"INSERT INTO {table} ({names}) SELECT {values} FROM batch", list(constants.values()),
                      pa.table(columns))

    def add_run(self, **run: object) -> None:
        run = dict(run)
        run["settings"] = json.dumps(run["settings"])
        run["versions"] = json.dumps(run["versions"])
        names = list(run)
        self._execute(f"INSERT INTO t_runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                         [run[n] for n in names])

    def add_source(self, model: str, source: str, layer: int, n_units: int, hook: str, *, kind: str,
                   hook_name: str, signed: bool, histogram_every: int = 1, hook_out_name: str | None = None,
                   dictionary_path: str | None = None, dictionary_format: str | None = None,
                   architecture: str | None = None, config: dict | None = None) -> None:
        self._execute(
            "INSERT INTO t_sources VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [model, source, layer, n_units, hook, kind, hook_name, hook_out_name, signed, histogram_every,
             dictionary_path, dictionary_format, architecture, None if config is None else json.dumps(config)])

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

    def add_units(self, model: str, source: str, layer: int, *, max_activation: np.ndarray,
                  min_activation: np.ndarray, n_tokens: np.ndarray, n_firing: np.ndarray,
                  sum_activation: np.ndarray, sum_squares: np.ndarray, n_examples: np.ndarray) -> None:
        """One row per unit, units numbered 0..n-1; NaN max/min (no token seen) become NULL."""
        n = len(max_activation)
        self._insert("t_units", {
            "unit": np.arange(n, dtype=np.int32),
            "max_activation": pa.array(np.asarray(max_activation, np.float32), from_pandas=True),
            "min_activation": pa.array(np.asarray(min_activation, np.float32), from_pandas=True),
            "n_tokens": np.broadcast_to(np.asarray(n_tokens, np.int64), (n,)),
            "n_firing": np.asarray(n_firing, np.int64),
            "sum_activation": np.asarray(sum_activation, np.float64),
            "sum_squares": np.asarray(sum_squares, np.float64),
            "n_examples": np.asarray(n_examples, np.int32),
        }, self._keys(model, source, layer))

    def add_examples(self, model: str, source: str, layer: int, kind: str, *, units: np.ndarray,
                     ranks: np.ndarray, context_ids: np.ndarray, positions: np.ndarray, values: np.ndarray,
                     activations: np.ndarray, context_lengths: np.ndarray, interval_lo: np.ndarray | None = None,
                     interval_hi: np.ndarray | None = None) -> None:
        """Examples of one kind, one row each: activations [n, width] are cut to context_lengths [n] and stored
        as store/encoding.py says (values, the max_activation column, fixes each example's grid)."""
        values = np.asarray(values, np.float32)
        encoded = encoding.encode(activations, context_lengths, values)
        intervals = {} if interval_lo is None else {"interval_lo": np.asarray(interval_lo, np.float32),
                                                    "interval_hi": np.asarray(interval_hi, np.float32)}
        self._insert("t_examples", {
            "unit": np.asarray(units, np.int32), **intervals, "rank": np.asarray(ranks, np.int32),
            "context_id": np.asarray(context_ids, np.int64), "max_position": np.asarray(positions, np.int32),
            "max_activation": values, **encoded.columns(),
        }, {**self._keys(model, source, layer), "example_kind": kind})

    def add_histograms(self, model: str, source: str, layer: int, counts: np.ndarray) -> None:
        """counts [units, 2 * HALF + 1]: column HALF + b holds bin b (see the histograms view)."""
        n_units, width = counts.shape
        half = width // 2
        unit_idx, column = np.nonzero(counts)
        lengths = np.bincount(unit_idx, minlength=n_units)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        self._insert("t_histograms", {
            "unit": np.arange(n_units, dtype=np.int32),
            "bins": pa.ListArray.from_arrays(offsets, pa.array((column - half).astype(np.int16))),
            "counts": pa.ListArray.from_arrays(offsets, pa.array(counts[unit_idx, column].astype(np.int64))),
        }, self._keys(model, source, layer))

    def add_logits(self, model: str, source: str, layer: int, polarity: str, token_ids: np.ndarray,
                   effects: np.ndarray) -> None:
        """token_ids, effects [units, n]: each unit's tokens, strongest first."""
        n_units, n = token_ids.shape
        self._insert("t_logits", {
            "unit": np.repeat(np.arange(n_units, dtype=np.int32), n),
            "rank": np.tile(np.arange(1, n + 1, dtype=np.int32), n_units),
            "token_id": token_ids.reshape(-1).astype(np.int32), "effect": effects.reshape(-1).astype(np.float32),
        }, {**self._keys(model, source, layer), "polarity": polarity})

    def add_neighbours(self, model: str, source: str, layer: int, kind: str, index: np.ndarray, score: np.ndarray,
                       other: list[tuple[str, int, int]] | None = None) -> None:
        """index, score [units, k]: each unit's neighbours, best first; index numbers the same source's units, or
        rows of `other` ((source, layer, unit) of each candidate) when they come from several sources; -1 where a
        unit has fewer than k (no row)."""
        n_units, k = index.shape
        kept = index.reshape(-1) >= 0
        flat = index.reshape(-1)[kept]
        if other is None:
            others = {"other_source": [source] * flat.size, "other_layer": np.full(flat.size, layer, np.int32),
                      "other_unit": flat.astype(np.int32)}
        else:
            picked = [other[i] for i in flat.tolist()]
            others = {"other_source": [p[0] for p in picked], "other_layer": np.array([p[1] for p in picked], np.int32),
                      "other_unit": np.array([p[2] for p in picked], np.int32)}
        self._insert("t_neighbours", {
            "unit": np.repeat(np.arange(n_units, dtype=np.int32), k)[kept],
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), n_units)[kept], **others,
            "score": score.reshape(-1)[kept].astype(np.float32)}, {**self._keys(model, source, layer), "kind": kind})

    def add_layout(self, model: str, source: str, layer: int, kind: str, xy: np.ndarray) -> None:
        """xy [units, 2]: each unit's place on the source's map (harvest/layout.py), units numbered by row; kind:
        the directions it was computed from ('decoder', 'output')."""
        xy = np.asarray(xy, np.float32)
        if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
            raise ValueError(f"add_layout({source!r}, layer {layer}): pass finite [units, 2] coordinates, as "
                             f"harvest/layout.py's layout returns them (got shape {xy.shape})")
        self._insert("t_layout", {"unit": np.arange(len(xy), dtype=np.int32), "x": xy[:, 0], "y": xy[:, 1]},
                     {**self._keys(model, source, layer), "kind": kind})

    def add_ablations(self, model: str, source: str, layer: int, units: np.ndarray, context_ids: np.ndarray,
                      positions: np.ndarray, effects: list[np.ndarray]) -> None:
        """Row i: unit units[i] removed at positions[i] of context context_ids[i] (a top example's max token), and
        effects[i], the change in log p of each token after it (harvest/ablation.py)."""
        lengths = np.array([len(e) for e in effects], np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        values = np.concatenate(effects).astype(np.float32) if effects else np.zeros(0, np.float32)
        self._insert("t_ablations", {
            "unit": np.asarray(units, np.int32), "context_id": np.asarray(context_ids, np.int64),
            "position": np.asarray(positions, np.int32),
            "effects": pa.ListArray.from_arrays(offsets, pa.array(values, pa.float32()))},
            self._keys(model, source, layer))

    def add_attributions(self, model: str, source: str, layer: int, kind: str, units: np.ndarray,
                         context_ids: np.ndarray, positions: np.ndarray, shares: list[np.ndarray],
                         weights: list[np.ndarray] | None = None, constants: np.ndarray | None = None) -> None:
        """Row i: unit units[i] at positions[i] of context context_ids[i] (an example's max token), with each
        earlier position's shares[i] (and, for heads, attention weights[i]; for dictionaries, the constant term),
        as harvest/attention.py computes them; kind 'head' or 'dictionary'."""
        n = len(shares)
        self._insert("t_attributions", {
            "unit": np.asarray(units, np.int32), "context_id": np.asarray(context_ids, np.int64),
            "position": np.asarray(positions, np.int32),
            "weights": pa.nulls(n, pa.list_(pa.float32())) if weights is None else _float_lists(weights),
            "shares": _float_lists(shares),
            "constant": pa.nulls(n, pa.float32()) if constants is None else np.asarray(constants, np.float32)},
            {**self._keys(model, source, layer), "kind": kind})

    def add_vocabulary(self, model: str, token_ids: np.ndarray, tokens: list[str]) -> None:
        self._insert("t_vocabulary", {"token_id": np.asarray(token_ids, np.int32), "token": tokens}, {"model": model})

    @staticmethod
    def _keys(model: str, source: str, layer: int) -> dict[str, object]:
        return {"model": model, "source": source, "layer": layer}


def _float_lists(arrays: list[np.ndarray]) -> pa.ListArray:
    """A FLOAT[] column from one float array per row, built from offsets (no Python loop over the values)."""
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays], dtype=np.int64)]).astype(np.int32)
    values = np.concatenate(arrays).astype(np.float32) if arrays else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32()))
