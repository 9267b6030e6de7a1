"""Awkward batches for the accumulators: many tied scores, padding, BOS, a unit that never fires, a unit's range
growing by several powers of two at once, strided activations, and on request every histogram edge value."""

from __future__ import annotations

import torch

from featureatlas.harvest.batchview import BatchView
from featureatlas.store.sampling import sampling_keys

# 11 counted rows of 12 (BOS) in a full context: native.reduce takes 8 at once, then 1 by 1. Lists wider than the
# batches' tokens: the rest is zero padding.
UNITS, TOKENS, WIDTH = 13, 12, 14
SCALES = [1.0, 0.25, 9.0, 300.0, 0.5, 2.0]  # batch 3 raises the units' ranges by up to five doublings at once


def batches(dtype: torch.dtype, strided: bool, edges: bool = False) -> list[tuple[torch.Tensor, BatchView]]:
    """Six batches of [4 to 6 contexts, TOKENS, UNITS] and their views, context ids increasing with gaps as a
    shard's. edges: one token of batch 2 holds every histogram edge (zero, below 2^-16, at and beyond 2^16, infinities,
    both signs)."""
    generator = torch.Generator().manual_seed(0)
    out, next_id = [], 0
    for i, scale in enumerate(SCALES):
        size = 4 + i % 3
        shape = (size, TOKENS, UNITS)
        levels = torch.randint(-4, 5, shape, generator=generator).float() / 2  # ties everywhere
        spread = torch.randn(shape, generator=generator) * 2  # and values anywhere within the bins
        values = torch.where(torch.rand(shape, generator=generator) < 0.5, levels, spread)
        values[:, :, 0] = 0  # a unit that never fires
        acts = (values * scale).to(dtype)
        if edges and i == 2:
            acts[:, 3, 1:9] = torch.tensor([1e-7, -1e-7, 2.0**16, -(2.0**16), 6e4, -6e4, float("inf"),
                                            float("-inf")]).to(dtype)
        if strided:
            acts = acts.transpose(1, 2).contiguous().transpose(1, 2)  # [batch, tokens, units], units not innermost
        lengths = torch.full((size,), TOKENS)
        if i % 2:
            lengths[-2:] = torch.tensor([TOKENS - 3, 2])
        counted = torch.arange(TOKENS)[None, :] < lengths[:, None]
        counted[:, 0] = False  # BOS
        ids = torch.arange(next_id, next_id + size)
        next_id += size + 3  # increasing, with gaps as a shard's
        view = BatchView(counted, 1, bool(i % 2), ids, torch.from_numpy(sampling_keys(ids.numpy(), 7)),
                         int(counted.sum()))
        out.append((acts, view))
    return out


def sparse_batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, BatchView, torch.Tensor]]:
    """Dictionary features: mostly zeros; unit 2 has only negative counted non-zeros, unit 3 fires at BOS only,
    a NaN in one context; non-zeros listed position by position in a scrambled order within each (a top-k
    encode's order) in every other batch."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for i, (acts, view) in enumerate(batches(dtype, False)):
        acts = acts.float().nan_to_num(posinf=0, neginf=0)
        acts = torch.where(torch.rand(acts.shape, generator=generator) < 0.6, 0, acts.abs()).to(dtype)
        acts[:, 1:, 2] = -acts[:, 1:, 2]
        acts[:, 1:, 3], acts[:, 0, 3] = 0, 7
        acts[0, 2, 4] = float("nan")  # a context with a NaN never fires
        nonzeros = acts.reshape(-1).nonzero().squeeze(1)
        if i % 2:
            position = nonzeros // UNITS
            scramble = torch.rand(nonzeros.shape, generator=generator)
            nonzeros = nonzeros[torch.argsort(position.double() + scramble * 0.5)]
        out.append((acts, view, nonzeros))
    return out
