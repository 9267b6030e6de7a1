"""How per-token activations are stored: 16-bit integers on a grid fixed by each example's own max, about 40% fewer
bytes than (DuckDB-compressed) float32, while everything ranked, counted or compared stays exact.

An example's activations x (float32, one per token) and its max_activation m (its min, for bottom examples) are
stored as codes q (activations_q SMALLINT[], one per token) and a step count Q (activations_levels SMALLINT):

    Q    = min(LEVELS, floor(LEVELS * |m| / max|x|))    steps from 0 to |m|; the largest |x| is LEVELS steps or fewer
    step = |m| / Q                                      (float64)
    q    = round(x / step)                              |q| <= LEVELS = 32,767: int16
    x'   = float32(q * step)                            what the `examples` view computes (list_transform in SQL)

m is a whole number Q of steps, so it decodes exactly: Q * (|m| / Q) is within 2^-52 of |m|, which float32 rounds
back to m. A token that is not m lies at least a step (over 256 float32 units in the last place of a normal m)
from it once decoded, on its own side, unless it rounds to m's own code, which the encoder refuses (below). So:
zeros stay exactly zero; activations[max_position] = max_activation; every token compares with m as its exact
value does, so the max (min) and its first position read from the activations are the harvest's; and every
token is within half a step, |x - x'| <= |m| / (2Q) < max|x| (1 + 1/Q) / (2 LEVELS), plus float32's rounding:
ROUNDING (1.54e-5) times the example's largest |activation| in all.

An example is kept exactly instead (activations_exact FLOAT[], the other two NULL) where the grid cannot promise
that: a NaN or infinite activation; a max that is zero, subnormal or not finite; Q < MIN_LEVELS (its largest
|activation| over 32 times its max: an attention-sink BOS, or a signed unit's low-valued example among large
negatives); or a token other than m that would round to m's code (within half a step of it).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

LEVELS = 32767       # the largest code: int16's symmetric range
MIN_LEVELS = 1024    # fewer steps from 0 to the max than this: the example is kept exactly
# The largest |x - x'| as a share of the example's largest |activation|: half a step, at most
# (1 + 1/MIN_LEVELS) / (2 LEVELS) of it since Q > LEVELS |m| / max|x| - 1, plus float32's rounding of q * step.
ROUNDING = (1 + 1 / MIN_LEVELS) / (2 * LEVELS) + 2.0 ** -23
_SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)


def rounding_bound(max_abs: float | np.ndarray) -> float | np.ndarray:
    """How far a stored activation may be from the harvested one, given the example's largest |activation|."""
    return ROUNDING * np.abs(max_abs)


class Encoded:
    """A batch of examples' activations as t_examples columns, one row per example."""

    def __init__(self, codes: pa.ListArray, levels: pa.Array, exact: pa.ListArray):
        self.codes = codes  # activations_q: NULL where the example is kept exactly
        self.levels = levels  # activations_levels: Q, NULL likewise
        self.exact = exact  # activations_exact: NULL where the example is on the grid

    def columns(self) -> dict[str, pa.Array]:
        return {"activations_q": self.codes, "activations_levels": self.levels, "activations_exact": self.exact}


def _grid(acts: np.ndarray, valid: np.ndarray, values: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(on_grid [n], levels Q [n] float64, step [n] float64, codes q [n, width] int16) for rows of acts [n, width]
    cut to `valid`, with the rows' m in values [n]. A few whole-array passes; no loop per example."""
    m = np.asarray(values, np.float32)
    magnitude = np.abs(np.where(valid, acts, np.float32(0))).max(axis=1, initial=0).astype(np.float64)
    reference = np.abs(m.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        levels = np.where(magnitude > 0, np.floor(LEVELS * reference / magnitude), LEVELS)
    levels = np.where(np.isfinite(magnitude * reference), np.minimum(levels, LEVELS), 0)  # NaN or inf: no grid
    on_grid = (reference >= _SMALLEST_NORMAL) & np.isfinite(reference) & (levels >= MIN_LEVELS)
    step = np.where(on_grid, reference / np.where(on_grid, levels, 1), 1.0)
    x = np.where(valid & on_grid[:, None], acts, np.float32(0))
    codes = np.rint(x * (1 / step)[:, None]).astype(np.int16)
    own = np.where(m < 0, -levels, levels).astype(np.int16)  # m's code
    on_grid &= ~((codes == own[:, None]) & (x != m[:, None])).any(axis=1)  # a token that would decode to m
    return on_grid, levels, step, codes


def encode(acts: np.ndarray, lengths: np.ndarray, values: np.ndarray) -> Encoded:
    """acts [n, width] float32 cut to lengths [n], each row's max_activation (its min, for bottom examples) in
    values [n]: the t_examples columns."""
    lengths = np.asarray(lengths, np.int64)
    acts = np.asarray(acts, np.float32)
    acts = acts.reshape(len(lengths), -1) if len(lengths) else np.zeros((0, 0), np.float32)
    valid = np.arange(acts.shape[1]) < lengths[:, None]
    on_grid, levels, _, codes = _grid(acts, valid, values)

    def ragged(rows: np.ndarray, keep: np.ndarray) -> pa.ListArray:
        offsets = pa.array(np.concatenate([[0], np.cumsum(np.where(keep, lengths, 0))]).astype(np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(rows[valid & keep[:, None]]), mask=pa.array(~keep))

    return Encoded(ragged(codes, on_grid), pa.array(levels.astype(np.int16), mask=~on_grid), ragged(acts, ~on_grid))


def round_trip(acts: np.ndarray, value: float) -> np.ndarray:
    """One example's activations as a store gives them back (decoded as the view does), for verify's bit-for-bit
    check of a recomputation."""
    x = np.asarray(acts, np.float32)[None, :]
    on_grid, _, step, codes = _grid(x, np.ones(x.shape, bool), np.array([value], np.float32))
    return (codes[0] * step[0]).astype(np.float32) if on_grid[0] else x[0].copy()
