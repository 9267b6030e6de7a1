"""Per-token activations on the store's 16-bit grid (store/encoding.py): what the `examples` view gives back is
within the documented rounding, the max and zeros are exact, and what cannot be kept so is kept exactly."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np

from featureatlas.store.encoding import LEVELS, MIN_LEVELS, ROUNDING, round_trip, rounding_bound
from featureatlas.store.writer import StoreWriter

WIDTH = 64


def examples(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Rows as a harvest makes them: BOS first (never counted, often the largest), each row's first max (min, for
    bottom rows) over the counted tokens as its value and position; dense, sparse and sign-mixed rows, scales
    from 1e-6 to 1e6, a float32 cut of lengths."""
    scale = 10.0 ** rng.uniform(-6, 6, (n, 1))
    acts = (rng.standard_normal((n, WIDTH)) * scale).astype(np.float32)
    sparse = rng.random(n) < 0.3
    acts[sparse] = np.where(rng.random((int(sparse.sum()), WIDTH)) < 0.9, 0, np.abs(acts[sparse]))
    acts[:, 0] *= rng.choice([0.5, 3, 30], n).astype(np.float32)  # BOS: now and then an attention sink
    lengths = rng.integers(2, WIDTH + 1, n)
    bottom = rng.random(n) < 0.4
    counted = (np.arange(WIDTH) >= 1) & (np.arange(WIDTH) < lengths[:, None])
    signed = np.where(bottom[:, None], -acts, acts)
    positions = np.where(counted, signed, -np.inf).argmax(axis=1)
    values = acts[np.arange(n), positions]
    return {"acts": acts, "lengths": lengths, "bottom": bottom, "positions": positions, "values": values}


def write(path: Path, rows: dict[str, np.ndarray]) -> list[tuple]:
    """The rows through StoreWriter, read back from the examples view in row order."""
    with StoreWriter(path) as store:
        for kind, mask in (("top", ~rows["bottom"]), ("bottom", rows["bottom"])):
            index = np.flatnonzero(mask)
            store.add_examples("m", "resid", 0, kind, units=index, ranks=np.ones(len(index)), context_ids=index,
                               positions=rows["positions"][index], values=rows["values"][index],
                               activations=rows["acts"][index], context_lengths=rows["lengths"][index])
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT unit, max_position, max_activation, activations FROM examples ORDER BY unit"
                           ).fetchall()
    finally:
        con.close()


def test_view_gives_back_the_activations_within_the_documented_rounding(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = examples(rng, 4000)
    read = write(tmp_path / "s.duckdb", rows)
    assert len(read) == 4000
    for unit, position, value, stored in read:
        x = rows["acts"][unit, :rows["lengths"][unit]]
        got = np.array(stored, np.float32)
        assert got.dtype == np.float32 and len(got) == len(x)
        assert np.array_equal(got, round_trip(x, value))  # the view decodes exactly as the encoder rounds
        assert np.abs(got.astype(np.float64) - x).max() <= rounding_bound(np.abs(x).max())
        assert (got[x == 0] == 0).all()  # zeros stay exactly zero
        assert got[position] == value == x[position]  # the max (min) is exact, at its position
        assert np.array_equal(np.sign(got - value), np.sign(x - value))  # none rounds up to tie or pass it
        first = 1 + int(np.argmin(got[1:]) if rows["bottom"][unit] else np.argmax(got[1:]))
        assert first == position  # so the max's first position reads the same from the stored activations


def test_what_the_grid_cannot_hold_is_kept_exactly(tmp_path: Path) -> None:
    """NaN and infinities, a zero max, a max under 1/32 of the largest |activation|, a token that would round to
    tie the max: each such example is stored as float32, bit for bit; the others on the grid."""
    rng = np.random.default_rng(1)
    acts = rng.uniform(0.1, 0.9, (7, WIDTH)).astype(np.float32)
    acts[:, 5] = 1.0
    values, positions = np.ones(7, np.float32), np.full(7, 5)
    acts[1, 9], acts[2, 9], acts[3, 9] = np.nan, np.inf, -np.inf
    acts[4] = np.where(np.arange(WIDTH) % 2, 0.0, -0.5)  # a top example whose max is 0, every other token negative
    values[4], positions[4] = 0.0, 1
    acts[5, 0] = 1.0 * LEVELS / MIN_LEVELS * 1.01  # BOS over 32 times the max
    acts[6, 7] = np.nextafter(np.float32(1.0), np.float32(0))  # after the max, just below it
    rows = {"acts": acts, "lengths": np.full(7, WIDTH), "bottom": np.zeros(7, bool), "positions": positions,
            "values": values}
    read = write(tmp_path / "s.duckdb", rows)
    for unit, _, _, stored in read:
        assert np.array_equal(np.array(stored, np.float32), acts[unit], equal_nan=True) == (unit > 0), unit
    con = duckdb.connect(str(tmp_path / "s.duckdb"), read_only=True)
    kept = con.execute("SELECT list(unit ORDER BY unit) FILTER (activations_exact IS NOT NULL), "
                       "list(activations_levels ORDER BY unit) FILTER (activations_q IS NOT NULL) FROM t_examples"
                       ).fetchone()
    con.close()
    assert kept == ([1, 2, 3, 4, 5, 6], [LEVELS])  # row 0: the max is the largest |activation|, all 32,767 steps


def test_rounding_is_half_a_step_of_at_most_max_abs_over_32767() -> None:
    assert (1 + 1 / MIN_LEVELS) / 65_534 < ROUNDING < 1.54e-5  # half a step, plus float32's rounding
    x = np.float32([0, 3.0, -1.5, 1e-4, 0.999])
    assert np.array_equal(round_trip(x, np.float32(3.0)) == 0, x == 0)
    assert np.abs(round_trip(x, np.float32(3.0)) - x).max() <= 3.0 / 65_534 + 1e-7
