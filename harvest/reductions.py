"""Per batch and source, the reductions over tokens that every accumulator starts from.

Dense units: each context's max and min (over counted positions only) feed top-k, bottom-k, the samples and the
statistics; the per-unit sum, sum of squares and firing count feed the statistics. Eagerly these are several
passes over the activations; compiled with torch.compile (Inductor) they fuse into one (`--compile` chooses; on
CPU the native loops reduce in one pass without it, native.py). Sparse units (dictionary features): the same from
their non-zeros alone (`firing`). Every form is tested against the eager one and against brute force.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

from featureatlas.harvest.activation_rows import SparseRows

Reduced = tuple[torch.Tensor, ...]


def reduce_eager(acts: torch.Tensor, counted: torch.Tensor, first: int, padded: bool) -> Reduced:
    """(context max, context min [batch, units]; sum, sum of squares (float32), firing count [units]). padded:
    whether any position from first on is uncounted (BatchView's: no need to ask the GPU)."""
    x = acts[:, first:]  # a view: no copy in the common case
    high = low = x
    if padded:
        uncounted = ~counted[:, first:, None]
        high, low = x.masked_fill(uncounted, float("-inf")), x.masked_fill(uncounted, float("inf"))
    # Sums as one matrix product with the counted mask: BOS and padding weigh exactly zero, over a contiguous
    # [tokens, units] view (a strided sum that skips BOS is several times slower).
    flat = acts.reshape(-1, acts.shape[-1])
    if flat.dtype != torch.float32:  # a bfloat16 product would round each batch's sum to 8 bits
        flat = flat.float()
    weight = counted.reshape(1, -1).to(flat.dtype)
    return (high.amax(dim=1), low.amin(dim=1), (weight @ flat)[0].float(), (weight @ flat.square())[0].float(),
            (weight @ flat.relu().sign_())[0].round().long())


class Firing(NamedTuple):
    """A sparse source's batch, from its non-zeros alone: never a pass over the dense [batch, tokens, units]
    (counted positions only)."""
    units: torch.Tensor         # [nnz] the unit of each counted non-zero activation
    values: torch.Tensor        # [nnz] its value
    pair_rows: torch.Tensor     # [pairs] batch row of each (context, unit) pair where the unit fires
    pair_units: torch.Tensor    # [pairs]
    pair_max: torch.Tensor      # [pairs] float32: the context's max for the unit (> 0)
    batch_max: torch.Tensor     # [units] float32: the largest pair_max (0 where none)


def firing(nonzeros: SparseRows, counted: torch.Tensor) -> Firing:
    """A context's max for a unit is the max of its counted non-zeros, or 0 where some counted position is zero;
    only contexts where it is > 0 fire."""
    n_units = nonzeros.shape[2]
    keep = counted.reshape(-1)[nonzeros.token]
    units, values = nonzeros.units[keep], nonzeros.values[keep]
    pairs, pair_of = torch.unique(nonzeros.pair[keep], return_inverse=True)
    pair_max = torch.full(pairs.shape, float("-inf"), device=values.device)
    pair_max.scatter_reduce_(0, pair_of, values.float(), "amax")
    fires = pair_max > 0
    pairs, pair_max = pairs[fires], pair_max[fires]
    pair_units = pairs % n_units
    batch_max = torch.zeros(n_units, device=values.device).scatter_reduce_(0, pair_units, pair_max, "amax")
    return Firing(units, values, torch.div(pairs, n_units, rounding_mode="floor"), pair_units, pair_max, batch_max)


def _reduce_fused(acts: torch.Tensor, counted: torch.Tensor, first: int, padded: bool) -> Reduced:
    """The same reductions written for Inductor to fuse into one pass. Tokens are reduced in chunks of up to 16
    (then across chunks): Inductor's loop walks a 16-unit column down the chunk's token rows, and 16 such
    streams at a time are what the CPU's prefetchers follow (bench/RESULTS.md). Every position goes through the
    counted mask (BOS included), so no slice breaks the chunks. Firing is counted in float32, which vectorises
    without widening to int64."""
    b, t, u = acts.shape
    chunk = _chunk_of(t)
    x = acts.reshape(b, t // chunk, chunk, u)
    keep = counted.reshape(b, t // chunk, chunk, 1)
    values = torch.where(keep, x.float(), 0.0)
    return (torch.where(keep, x, float("-inf")).amax(2).amax(1), torch.where(keep, x, float("inf")).amin(2).amin(1),
            values.sum(2).sum((0, 1)), (values * values).sum(2).sum((0, 1)),
            (values > 0).float().sum(2).sum((0, 1)).long())  # counted in float32: exact below 2^24 tokens a batch


def _chunk_of(tokens: int) -> int:
    """The largest divisor of tokens up to 16 (16 for the usual context lengths)."""
    return next(c for c in range(min(tokens, 16), 0, -1) if tokens % c == 0)


def fused(fn: Callable, fallback: Callable) -> Callable:
    """fn compiled with torch.compile (Inductor), falling back to `fallback` for good, with one line on stderr,
    where Inductor cannot build (no C++ compiler, an unsupported platform). Always called without grad, so
    that callers in and out of inference mode share its graphs (grad mode is part of what they are keyed on).
    torch.compile itself runs at the first call (importing its compiler takes about a second): paths the native
    loops replace never pay it."""
    compiled: list[Callable] = []

    def call(*args: object) -> object:
        if not call.fell_back:
            try:
                if not compiled:
                    compiled.append(torch.compile(fn, dynamic=True))
                with torch.no_grad():
                    return compiled[0](*args)
            except Exception as err:  # Inductor failures come as many exception types
                print(f"featureatlas: torch.compile is unavailable here ({type(err).__name__}: {err}"[:300]
                      + "); harvesting without it (slower; pass --compile off to skip trying)", file=sys.stderr)
                call.fell_back = True
        return fallback(*args)
    call.fell_back = False  # read by tests/test_gpu_parity.py
    return call


_compiled: dict[Callable, Callable] = {}


def compiled_once(fn: Callable, fallback: Callable | None = None) -> Callable:
    """fused(fn, fallback or fn), made once per process: its compiled graphs are shared by every caller."""
    if fn not in _compiled:
        _compiled[fn] = fused(fn, fallback or fn)
    return _compiled[fn]


def reducer(compiled: bool) -> Callable[[torch.Tensor, torch.Tensor, int, bool], Reduced]:
    """The dense reduction: fused by torch.compile (shared by every caller in the process), or eager."""
    return compiled_once(_reduce_fused, reduce_eager) if compiled else reduce_eager
