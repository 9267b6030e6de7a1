"""Per batch and source, the reductions over tokens that every accumulator starts from.

Each context's max and min (over counted positions only) feed top-k, bottom-k, the samples and the statistics;
the per-unit sum, sum of squares and firing count feed the statistics of dense units. Eagerly these are
several passes over the activations; compiled with torch.compile (Inductor) they fuse into one, which is about
seven times faster on a CPU and makes them a small part of the harvest. `--compile` chooses; both paths are
tested against brute force.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

Reduced = tuple[torch.Tensor, ...]


def reduce_eager(acts: torch.Tensor, counted: torch.Tensor, first: int) -> Reduced:
    """(context max, context min [batch, units]; sum, sum of squares (float32), firing count [units])."""
    x = acts[:, first:]  # a view: no copy in the common case
    high = low = x
    if not bool(counted[:, first:].all()):
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


def reduce_extremes(acts: torch.Tensor, counted: torch.Tensor, first: int) -> Reduced:
    """Only each context's max and min: sparse units' statistics touch their non-zeros instead."""
    x = acts[:, first:]
    if bool(counted[:, first:].all()):
        return x.amax(dim=1), x.amin(dim=1)
    uncounted = ~counted[:, first:, None]
    return x.masked_fill(uncounted, float("-inf")).amax(dim=1), x.masked_fill(uncounted, float("inf")).amin(dim=1)


def _reduce_fused(acts: torch.Tensor, counted: torch.Tensor, first: int) -> Reduced:
    """The same reductions written for Inductor to fuse into a single pass."""
    x = acts[:, first:]
    keep = counted[:, first:, None]
    values = torch.where(keep, x.float(), 0.0)
    return (torch.where(keep, x, float("-inf")).amax(1), torch.where(keep, x, float("inf")).amin(1),
            values.sum((0, 1)), (values * values).sum((0, 1)), (values > 0).sum((0, 1)))


_compiled: Callable[..., Reduced] | None = None


def reducer(compiled: bool) -> Callable[[torch.Tensor, torch.Tensor, int], Reduced]:
    """The compiled reducer, falling back to the eager one (with one line on stderr) where Inductor cannot
    build (no C++ compiler, an unsupported platform)."""
    if not compiled:
        return reduce_eager
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_reduce_fused, dynamic=True)

    def reduce(acts: torch.Tensor, counted: torch.Tensor, first: int) -> Reduced:
        global _compiled
        if _compiled is not reduce_eager:
            try:
                return _compiled(acts, counted, first)
            except Exception as err:  # Inductor failures come as many exception types
                print(f"featureatlas: torch.compile is unavailable here ({type(err).__name__}); harvesting "
                      "without it (slower; pass --compile off to skip trying)", file=sys.stderr)
                _compiled = reduce_eager
        return reduce_eager(acts, counted, first)
    return reduce
