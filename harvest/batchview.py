"""What every accumulator needs to know about a batch besides the activations, moved to the device once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from featureatlas.harvest.contexts import Batch


@dataclass(frozen=True)
class BatchView:
    counted: torch.Tensor      # [batch, tokens] bool: positions that count (not BOS, not padding)
    first_counted: int         # no position before this counts (1 when contexts start with BOS)
    padded: bool               # whether any position after first_counted is padding
    context_ids: torch.Tensor  # [batch] int64, increasing
    keys: torch.Tensor         # [batch] int64: each context's random sampling key (seeded, order-free)
    n_counted: int             # counted positions in the batch

    @staticmethod
    def of(batch: Batch, first_counted: int, seed: int, device: torch.device) -> BatchView:
        keys = torch.from_numpy(sampling_keys(batch.context_ids.numpy(), seed))
        return BatchView(batch.counted.to(device, non_blocking=True), first_counted, batch.padded,
                         batch.context_ids.to(device, non_blocking=True), keys.to(device, non_blocking=True),
                         batch.n_text_tokens)


def sampling_keys(context_ids: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random 63-bit key per context (splitmix64 of seed and id). The samples are the contexts with the
    smallest keys, so they do not depend on batch order, shards or restarts: only on the seed and the corpus."""
    with np.errstate(over="ignore"):
        z = (np.asarray(context_ids, np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
             + np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)
