"""Two stores compared view by view: the same harvest run another way (resumed, sharded, on another backend or
device) must write the same rows."""

from __future__ import annotations

import math
from pathlib import Path

import duckdb

TIMING = {"started_at", "finished_at", "tokens_per_second"}  # when and how fast: columns that always differ
# Each batch's sums are float32, added in an order that depends on the batching and the backend: the totals agree
# to float32 rounding of the partial sums, checked on t_units against the scale of the unit's values.
SUMS = {"sum_activation", "sum_squares", "mean", "std"}
VIEWS = ("runs", "sources", "units", "statistics", "histograms", "examples", "logit_effects", "contexts",
         "documents", "vocabulary")


def query(path: Path, sql: str, params: list | None = None) -> list[tuple]:
    """A store's rows for `sql`, read with plain DuckDB on a connection of its own."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def store_rows(path: Path, leave_out: set[str] = TIMING) -> dict[str, list[list[tuple[str, object]]]]:
    """Every public view's rows as (column, value) pairs, sorted; the columns in leave_out left out."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = {}
        for view in VIEWS:
            table = "t_vocabulary" if view == "vocabulary" else view
            cursor = con.execute(f"SELECT * FROM {table}")
            names = [d[0] for d in cursor.description]
            rows[view] = sorted(([(n, v) for n, v in zip(names, row, strict=True) if n not in leave_out]
                                 for row in cursor.fetchall()), key=repr)
        return rows
    finally:
        con.close()


def assert_same_store(a: Path, b: Path, leave_out: set[str] = TIMING) -> None:
    """Equal row for row but for the columns in leave_out, and the sums behind mean and std to float32 rounding."""
    left, right = store_rows(a, leave_out), store_rows(b, leave_out)
    for view in left:
        assert len(left[view]) == len(right[view]), view
        for x, y in zip(left[view], right[view], strict=True):
            exact = [(n, v) for n, v in x if n not in SUMS], [(n, v) for n, v in y if n not in SUMS]
            assert exact[0] == exact[1], (view, x, y)
    sums = "SELECT source, layer, unit, n_tokens, sum_activation, sum_squares FROM t_units ORDER BY 1, 2, 3"
    for x, y in zip(query(a, sums), query(b, sums), strict=True):
        scale = math.sqrt(x[3] * x[5]) + 1e-30
        assert abs(x[4] - y[4]) <= 1e-5 * scale and abs(x[5] - y[5]) <= 1e-5 * x[5] + 1e-30, (x, y)
