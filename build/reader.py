"""Bulk reads from a store, only through its public views: one query per kind of row, columnar results."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class LayerKey:
    """One (model, source, layer): the unit of work and of the URL layout."""

    model: str
    source: str
    layer: int


@dataclass(frozen=True)
class LayerInfo:
    """A layer as the index page lists it."""

    key: LayerKey
    n_units: int  # units the store holds rows for
    n_active: int  # units with at least one example
    hook: str | None  # None when the layer has no sources row


@dataclass
class Catalog:
    """Everything the index page needs, read once by the main process."""

    runs: list[dict[str, Any]]
    layers: list[LayerInfo]

    def models(self) -> list[str]:
        return sorted({info.key.model for info in self.layers} | {run["model"] for run in self.runs})

    def bos_token(self, model: str) -> str | None:
        """The latest run's BOS token for a model (None when the tokenizer has none or no run is recorded)."""
        runs = [run for run in self.runs if run["model"] == model]
        return runs[-1]["bos_token"] if runs else None


@dataclass
class Contexts:
    """The contexts one chunk references; tokens flat, row i spans tokens[offsets[i]:offsets[i + 1]]."""

    ids: np.ndarray  # sorted context ids
    document_names: list[str]
    start_tokens: np.ndarray
    tokens: pa.Array  # flat string array, kept in Arrow: turning it into Python strings is the slow part
    offsets: np.ndarray

    def rows(self, context_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, context_ids)


@dataclass
class UnitChunk:
    """Units of one layer (every unit, for prev/next) and the examples of the slice [first, stop)."""

    units: np.ndarray  # all units of the layer, sorted
    max_activation: np.ndarray  # float64, NaN where the store has NULL
    n_examples: np.ndarray
    first: int  # index into `units`
    stop: int
    ex_unit: np.ndarray  # examples sorted by unit, then rank
    ex_rank: np.ndarray
    ex_context: np.ndarray
    ex_position: np.ndarray
    ex_max: np.ndarray
    act_values: np.ndarray  # float32, every example's activations back to back
    act_offsets: np.ndarray  # example i spans act_values[act_offsets[i]:act_offsets[i + 1]]
    contexts: Contexts


def _table(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> pa.Table:
    rel = con.sql(sql, params=params)
    # duckdb >= 1.4 names it to_arrow_table and deprecates the old name
    fetch = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table
    return fetch()


def _np(table: pa.Table, name: str, dtype: Any = None) -> np.ndarray:
    column = table.column(name).combine_chunks()
    if dtype is not None and pa.types.is_floating(column.type):
        return column.to_numpy(zero_copy_only=False).astype(dtype)  # NULL -> NaN
    array = column.to_numpy(zero_copy_only=False)
    return array.astype(dtype) if dtype is not None else array


def _flat_list(table: pa.Table, name: str) -> tuple[pa.Array, np.ndarray]:
    column = table.column(name).combine_chunks()
    if len(column) == 0:
        return column.flatten(), np.zeros(1, np.int64)
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.slice(offsets[0], offsets[-1] - offsets[0])
    return values, offsets - offsets[0]


def read_catalog(con: duckdb.DuckDBPyConnection) -> Catalog:
    """Runs and the layers of every (model, source), with unit counts."""
    runs = _table(con, "SELECT * FROM runs ORDER BY model, started_at, run_id", []).to_pylist()
    for run in runs:
        for key in ("started_at", "finished_at"):
            if isinstance(run.get(key), datetime):
                run[key] = run[key].strftime("%Y-%m-%d %H:%M")
    rows = con.sql("""
        WITH u AS (SELECT model, source, layer, count(*) AS n_units, count(max_activation) AS n_active
                   FROM units GROUP BY ALL)
        SELECT model, source, layer, coalesce(u.n_units, 0), coalesce(u.n_active, 0), s.hook
        FROM sources s FULL OUTER JOIN u USING (model, source, layer)
        ORDER BY model, source, layer""").fetchall()
    layers = [LayerInfo(LayerKey(m, s, int(layer)), int(n), int(active), hook)
              for m, s, layer, n, active, hook in rows]
    return Catalog(runs=runs, layers=layers)


def _read_contexts(con: duckdb.DuckDBPyConnection, key: LayerKey, lo: int, hi: int) -> Contexts:
    table = _table(con, """
        SELECT c.context_id, c.start_token, coalesce(d.name, '') AS name, c.tokens
        FROM contexts c LEFT JOIN documents d USING (document_id)
        WHERE c.context_id IN (SELECT context_id FROM examples
                               WHERE model = ? AND source = ? AND layer = ? AND unit BETWEEN ? AND ?)
        ORDER BY c.context_id""", [key.model, key.source, key.layer, lo, hi])
    tokens, offsets = _flat_list(table, "tokens")
    return Contexts(ids=_np(table, "context_id", np.int64), document_names=table.column("name").to_pylist(),
                    start_tokens=_np(table, "start_token", np.int64), tokens=tokens,
                    offsets=offsets)


def read_layer_units(con: duckdb.DuckDBPyConnection, key: LayerKey) -> pa.Table:
    """Every unit of a layer with its max activation and example count, sorted by unit."""
    return _table(con, """SELECT unit, max_activation, n_examples FROM units
                          WHERE model = ? AND source = ? AND layer = ? ORDER BY unit""",
                  [key.model, key.source, key.layer])


def read_unit_chunk(con: duckdb.DuckDBPyConnection, key: LayerKey, first: int, stop: int) -> UnitChunk:
    """Units [first, stop) of a layer (by position in unit order) with their examples and contexts."""
    units_table = read_layer_units(con, key)
    units = _np(units_table, "unit", np.int64)
    stop = min(stop, len(units))
    lo, hi = (int(units[first]), int(units[stop - 1])) if stop > first else (0, -1)
    ex = _table(con, """
        SELECT unit, rank, context_id, max_position, max_activation, activations FROM examples
        WHERE model = ? AND source = ? AND layer = ? AND unit BETWEEN ? AND ?
          AND context_id IN (SELECT context_id FROM contexts)  -- a dangling example is skipped, not misdrawn
        ORDER BY unit, rank""", [key.model, key.source, key.layer, lo, hi])
    values, offsets = _flat_list(ex, "activations")
    return UnitChunk(
        units=units, max_activation=_np(units_table, "max_activation", np.float64),
        n_examples=_np(units_table, "n_examples", np.int64), first=first, stop=stop,
        ex_unit=_np(ex, "unit", np.int64), ex_rank=_np(ex, "rank", np.int64),
        ex_context=_np(ex, "context_id", np.int64), ex_position=_np(ex, "max_position", np.int64),
        ex_max=_np(ex, "max_activation", np.float64),
        act_values=values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False),
        act_offsets=offsets, contexts=_read_contexts(con, key, lo, hi))


def read_snippets(con: duckdb.DuckDBPyConnection, key: LayerKey, before: int, after: int) -> pa.Table:
    """Per unit: the tokens around its top example's max token, with where that slice starts."""
    return _table(con, """
        SELECT u.unit, u.max_activation, u.n_examples, e.max_position,
               greatest(e.max_position - ?, 0) AS snippet_start, len(c.tokens) AS context_length,
               list_slice(c.tokens, greatest(e.max_position - ?, 0) + 1, e.max_position + 1 + ?) AS snippet
        FROM units u
        LEFT JOIN examples e ON e.model = u.model AND e.source = u.source AND e.layer = u.layer
                             AND e.unit = u.unit AND e.rank = 1
        LEFT JOIN contexts c ON c.context_id = e.context_id
        WHERE u.model = ? AND u.source = ? AND u.layer = ?
        ORDER BY u.unit""", [before, before, after, key.model, key.source, key.layer])
