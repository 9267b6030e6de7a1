"""Exact top-k max-activating contexts per unit, kept on the model's device and updated batch by batch.

Definition (Neuroscope's): a context's score for a unit is its max activation over the context's positions
(masked positions such as BOS and padding never count); a unit's top-k are the k contexts with the highest
score, ties going to the lower context id, and within a context to the first position reaching the max.
"""

from __future__ import annotations

import torch

from featureatlas.harvest.batchview import BatchView


class TopK:
    """Per-unit top-k contexts, with the per-token activations of every kept context.

    values/context_ids/positions are ordered by rank. The per-token activations live in k slots per unit that
    never move: `slots` says which slot holds each rank, so an update copies only contexts that enter.
    """

    STATE = ("values", "context_ids", "positions", "slots", "slot_activations")  # what a checkpoint saves

    def __init__(self, n_units: int, k: int, context_length: int, device: torch.device,
                 activation_dtype: torch.dtype):
        self.k = k
        self.values = torch.full((n_units, k), float("-inf"), device=device)
        self.context_ids = torch.full((n_units, k), -1, dtype=torch.int64, device=device)
        self.positions = torch.zeros((n_units, k), dtype=torch.int64, device=device)
        self.slots = torch.arange(k, device=device).repeat(n_units, 1)
        self.slot_activations = torch.zeros((n_units, k, context_length), dtype=activation_dtype, device=device)

    def update(self, acts: torch.Tensor, view: BatchView, context_max: torch.Tensor, scores: torch.Tensor,
               largest: bool = True) -> None:
        """acts [batch, tokens, units]; the batch's context ids are increasing, all larger than any seen before.
        scores: acts from view.first_counted on, uncounted positions masked to the losing extreme; context_max
        [batch, units]: each context's score (its max, or minus its min when largest is False, for bottom-k)."""
        batch, tokens, _ = acts.shape
        k, first_counted, context_ids = self.k, view.first_counted, view.context_ids
        # Only units whose best context in this batch beats their current k-th score can change; a tie with
        # the k-th score loses to it because every kept context has a lower id.
        units = (context_max.amax(dim=0).float() > self.values[:, -1]).nonzero().squeeze(1)
        if units.numel() == 0:
            return
        n = units.numel()
        candidate_values = torch.cat([self.values[units], context_max[:, units].T.float()], dim=1)  # [n, k + batch]
        # A stable sort keeps candidates in id order among equal scores: kept ones, then the batch in order.
        order = candidate_values.sort(dim=1, descending=True, stable=True).indices[:, :k]
        entering = order >= k                                                   # [n, k]: from this batch
        self.values[units] = candidate_values.gather(1, order)
        self.context_ids[units] = torch.cat([self.context_ids[units], context_ids.expand(n, batch)], 1).gather(1, order)
        kept_slots = self.slots[units].gather(1, order.clamp(max=k - 1))
        # Slots of dropped contexts are free; entering contexts take them in ascending order.
        used = torch.zeros((n, k + 1), dtype=torch.int8, device=acts.device)
        used.scatter_(1, torch.where(entering, k, kept_slots), 1)
        free = used[:, :k].argsort(dim=1, stable=True)                           # free slots first
        nth_entering = (entering.cumsum(dim=1) - 1).clamp(min=0)
        slots = torch.where(entering, free.gather(1, nth_entering), kept_slots)
        self.slots[units] = slots
        rows, ranks = entering.nonzero(as_tuple=True)
        entering_units = units[rows]
        entering_rows = order[rows, ranks] - k                                  # row in the batch
        entering_acts = acts[entering_rows, :, entering_units]                  # [m, tokens]
        entering_scores = scores[entering_rows, :, entering_units]
        positions = self.positions[units].gather(1, order.clamp(max=k - 1))
        extreme = entering_scores.argmax(dim=1) if largest else entering_scores.argmin(dim=1)  # first one reaching it
        positions[rows, ranks] = extreme + first_counted
        self.positions[units] = positions
        width = self.slot_activations.shape[2]
        if tokens < width:
            entering_acts = torch.nn.functional.pad(entering_acts, (0, width - tokens))
        self.slot_activations[entering_units, slots[rows, ranks]] = entering_acts.to(self.slot_activations.dtype)

    def activations(self) -> torch.Tensor:
        """[units, k, context_length]: the per-token activations of each rank's context."""
        return self.slot_activations.gather(1, self.slots[:, :, None].expand_as(self.slot_activations))

    def referenced_context_ids(self) -> torch.Tensor:
        ids = self.context_ids.unique()
        return ids[ids >= 0]
