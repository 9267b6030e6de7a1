"""Exact top-k max-activating contexts per unit, kept on the model's device and updated batch by batch.

Definition (Neuroscope's): a context's score for a unit is its max activation over the context's positions
(masked positions such as BOS and padding never count); a unit's top-k are the k contexts with the highest
score, ties going to the lower context id, and within a context to the first position reaching the max.
"""

from __future__ import annotations

import torch


class TopK:
    """Per-unit top-k contexts, with the per-token activations of every kept context."""

    def __init__(self, n_units: int, k: int, context_length: int, device: torch.device,
                 activation_dtype: torch.dtype):
        self.k = k
        self.values = torch.full((n_units, k), float("-inf"), device=device)
        self.context_ids = torch.full((n_units, k), -1, dtype=torch.int64, device=device)
        self.positions = torch.zeros((n_units, k), dtype=torch.int32, device=device)
        self.activations = torch.zeros((n_units, k, context_length), dtype=activation_dtype, device=device)

    def update(self, acts: torch.Tensor, counted: torch.Tensor, context_ids: torch.Tensor) -> None:
        """acts [batch, tokens, units]; counted [batch, tokens] (False for BOS and padding);
        context_ids [batch], increasing, all larger than any id seen before."""
        batch, tokens, _ = acts.shape
        scores = acts.float().masked_fill(~counted[:, :, None], float("-inf"))
        context_max, context_argmax = scores.max(dim=1)                        # [batch, units]
        # Only units whose best context in this batch beats their current k-th score can change; a tie with
        # the k-th score loses to it because every kept context has a lower id.
        units = (context_max.max(dim=0).values > self.values[:, -1]).nonzero().squeeze(1)
        if units.numel() == 0:
            return
        n = units.numel()
        candidate_values = torch.cat([self.values[units], context_max[:, units].T], dim=1)  # [n, k + batch]
        # A stable sort keeps candidates in id order among equal scores: kept ones, then the batch in order.
        order = candidate_values.sort(dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values[units] = candidate_values.gather(1, order)
        candidate_ids = torch.cat([self.context_ids[units], context_ids.expand(n, batch)], dim=1)
        self.context_ids[units] = candidate_ids.gather(1, order)
        candidate_positions = torch.cat(
            [self.positions[units], context_argmax[:, units].T.to(torch.int32)], dim=1)
        self.positions[units] = candidate_positions.gather(1, order)
        new_acts = acts[:, :, units].permute(2, 0, 1)                           # [n, batch, tokens]
        width = self.activations.shape[2]
        if tokens < width:
            new_acts = torch.nn.functional.pad(new_acts, (0, width - tokens))
        candidate_acts = torch.cat([self.activations[units], new_acts.to(self.activations.dtype)], dim=1)
        self.activations[units] = candidate_acts.gather(1, order[:, :, None].expand(-1, -1, width))

    def referenced_context_ids(self) -> torch.Tensor:
        ids = self.context_ids.unique()
        return ids[ids >= 0]
