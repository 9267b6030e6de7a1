"""What every accumulator needs to know about a batch besides the activations, moved to the device once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featureatlas.harvest.contexts import Batch
from featureatlas.store.sampling import sampling_keys


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
