"""Exact top-k max-activating contexts per unit, kept on the model's device and updated batch by batch.

Definition (Neuroscope's): a context's score for a unit is its max activation over the context's positions
(masked positions such as BOS and padding never count); a unit's top-k are the k contexts with the highest
score, ties going to the lower context id, and within a context to the first position reaching the max.
Sparse units (dictionary features) keep only contexts where they fire (score > 0): a feature that fired in three
contexts has three top examples, not three and seventeen where it is zero.
"""

from __future__ import annotations

import torch

from featureatlas.harvest.activation_rows import DenseRows, SparseRows
from featureatlas.harvest.batchview import BatchView
from featureatlas.harvest.reductions import compiled_once


class TopK:
    """Per-unit top-k contexts, with the per-token activations of every kept context.

    values/context_ids/positions are ordered by rank. The per-token activations live in k slots per unit that
    never move: `slots` says which slot holds each rank, so an update copies only contexts that enter.
    """

    STATE = ("values", "context_ids", "positions", "slots", "slot_activations")  # what a checkpoint saves

    def __init__(self, n_units: int, k: int, context_length: int, device: torch.device,
                 activation_dtype: torch.dtype, fixed_shapes: bool = False, compiled: bool = False):
        self.k = k
        self.fixed_shapes = fixed_shapes
        self._fixed_step = compiled_once(_merge_fixed) if compiled else _merge_fixed
        self.values = torch.full((n_units, k), float("-inf"), device=device)
        self.context_ids = torch.full((n_units, k), -1, dtype=torch.int64, device=device)
        self.positions = torch.zeros((n_units, k), dtype=torch.int64, device=device)
        self.slots = torch.arange(k, device=device).repeat(n_units, 1)
        self.slot_activations = torch.zeros((n_units, k, context_length), dtype=activation_dtype, device=device)

    def update(self, acts: DenseRows, view: BatchView, context_max: torch.Tensor, largest: bool = True) -> None:
        """Dense units. acts: the batch's [batch, tokens, units] activations; its context ids are increasing, all
        larger than any seen before. context_max [batch, units]: each context's score (its max over counted
        positions, or minus its min when largest is False, for bottom-k)."""
        if self.fixed_shapes:
            return self._update_fixed(acts.acts, view, context_max, largest)
        # Only units whose best context in this batch beats their current k-th score can change; a tie with
        # the k-th score loses to it because every kept context has a lower id.
        units = (context_max.amax(dim=0).float() > self.values[:, -1]).nonzero().squeeze(1)
        if units.numel() == 0:
            return
        batch, n = context_max.shape[0], units.numel()
        rows = torch.arange(batch, device=units.device).expand(n, batch)
        self._merge(acts, view, units, context_max[:, units].T.float(), rows, view.context_ids.expand(n, batch),
                    largest)

    def _update_fixed(self, acts: torch.Tensor, view: BatchView, context_max: torch.Tensor, largest: bool) -> None:
        """The same result with every unit merged every batch, in shapes that never depend on the data: no host
        synchronisation, which is what a GPU needs (the list form above waits on the GPU a dozen times a call).
        Slots stay in rank order here."""
        self.values, self.context_ids, self.positions, self.slot_activations = self._fixed_step(
            self.values, self.context_ids, self.positions, self.activations(), acts, context_max, view.context_ids,
            view.counted, view.first_counted, view.padded, largest)
        self.slots = torch.arange(self.k, device=acts.device).expand_as(self.values).clone()

    def update_pairs(self, acts: DenseRows | SparseRows, view: BatchView, rows: torch.Tensor, units: torch.Tensor,
                     values: torch.Tensor) -> None:
        """Sparse units: only the (batch row, unit) pairs where a unit fires, each with its context max."""
        enter = values > self.values[units, -1]
        rows, units, values = rows[enter], units[enter], values[enter]
        if units.numel() == 0:
            return
        # Each unit's candidates side by side in row (so id) order, padded with -inf, which never enters.
        order = (units * acts.shape[0] + rows).argsort()
        rows, units, values = rows[order], units[order], values[order]
        changed, counts = torch.unique_consecutive(units, return_counts=True)
        group = torch.repeat_interleave(counts)
        column = torch.arange(units.numel(), device=units.device) - (counts.cumsum(0) - counts)[group]
        width = int(counts.max())
        candidate_values = torch.full((changed.numel(), width), float("-inf"), device=values.device)
        candidate_values[group, column] = values
        candidate_rows = torch.zeros((changed.numel(), width), dtype=torch.int64, device=rows.device)
        candidate_rows[group, column] = rows
        self._merge(acts, view, changed, candidate_values, candidate_rows, view.context_ids[candidate_rows], True)

    def _merge(self, acts: DenseRows | SparseRows, view: BatchView, units: torch.Tensor, candidate_values: torch.Tensor,
               candidate_rows: torch.Tensor, candidate_ids: torch.Tensor, largest: bool) -> None:
        """units [n]: the units that may change; candidate_values/rows/ids [n, c]: their candidates from this
        batch (float32 scores; batch rows, so context ids, in increasing order)."""
        k, n = self.k, units.numel()
        values = torch.cat([self.values[units], candidate_values], dim=1)          # [n, k + c]
        # A stable sort keeps candidates in id order among equal scores: kept ones, then the batch in order.
        order = values.sort(dim=1, descending=True, stable=True).indices[:, :k]
        entering = order >= k                                                   # [n, k]: from this batch
        self.values[units] = values.gather(1, order)
        self.context_ids[units] = torch.cat([self.context_ids[units], candidate_ids], 1).gather(1, order)
        kept_slots = self.slots[units].gather(1, order.clamp(max=k - 1))
        # Slots of dropped contexts are free; entering contexts take them in ascending order.
        used = torch.zeros((n, k + 1), dtype=torch.int8, device=units.device)
        used.scatter_(1, torch.where(entering, k, kept_slots), 1)
        free = used[:, :k].argsort(dim=1, stable=True)                           # free slots first
        nth_entering = (entering.cumsum(dim=1) - 1).clamp(min=0)
        slots = torch.where(entering, free.gather(1, nth_entering), kept_slots)
        self.slots[units] = slots
        rows, ranks = entering.nonzero(as_tuple=True)
        entering_units = units[rows]
        entering_rows = candidate_rows[rows, order[rows, ranks] - k]             # row in the batch
        entering_acts = acts(entering_rows, entering_units)                     # [m, tokens]
        positions = self.positions[units].gather(1, order.clamp(max=k - 1))
        positions[rows, ranks] = extreme_positions(entering_acts, entering_rows, view, largest)
        self.positions[units] = positions
        tokens, width = acts.shape[1], self.slot_activations.shape[2]
        if tokens < width:
            entering_acts = torch.nn.functional.pad(entering_acts, (0, width - tokens))
        self.slot_activations[entering_units, slots[rows, ranks]] = entering_acts.to(self.slot_activations.dtype)

    def activations(self) -> torch.Tensor:
        """[units, k, context_length]: the per-token activations of each rank's context."""
        return self.slot_activations.gather(1, self.slots[:, :, None].expand_as(self.slot_activations))

    def referenced_context_ids(self) -> torch.Tensor:
        ids = self.context_ids.unique()
        return ids[ids >= 0]


def extreme_positions(rows_acts: torch.Tensor, rows: torch.Tensor, view: BatchView, largest: bool = True
                      ) -> torch.Tensor:
    """rows_acts [m, tokens]: the activations of one unit in batch row rows[i]. The first counted position
    reaching each row's max (or min); found on the few gathered rows, not on the whole batch."""
    first = view.first_counted
    scores = rows_acts[:, first:]
    if view.padded:
        uncounted = ~view.counted[rows, first:]
        scores = scores.masked_fill(uncounted, float("-inf") if largest else float("inf"))
    return (scores.argmax(dim=1) if largest else scores.argmin(dim=1)) + first


def _merge_fixed(values: torch.Tensor, context_ids: torch.Tensor, positions: torch.Tensor,
                 activations: torch.Tensor, acts: torch.Tensor, context_max: torch.Tensor, batch_ids: torch.Tensor,
                 counted: torch.Tensor, first: int, padded: bool, largest: bool) -> tuple[torch.Tensor, ...]:
    """TopK's fixed-shape merge as a pure function of tensors, for torch.compile: the new values, context ids,
    positions and rank-ordered activations [units, k, width]."""
    k, (_, tokens, n_units), width = values.shape[1], acts.shape, activations.shape[2]
    candidates = torch.cat([values, context_max.T.float()], dim=1)               # [units, k + batch]
    order = candidates.sort(dim=1, descending=True, stable=True).indices[:, :k]
    entering, kept, rows = order >= k, order.clamp(max=k - 1), (order - k).clamp(min=0)
    units = torch.arange(n_units, device=acts.device)[:, None]
    entered = acts[rows, :, units]                                                # [units, k, tokens]
    scores = entered[:, :, first:]
    if padded:
        scores = scores.masked_fill(~counted[rows, first:], float("-inf") if largest else float("inf"))
    found = (scores.argmax(dim=2) if largest else scores.argmin(dim=2)) + first
    if tokens < width:
        entered = torch.nn.functional.pad(entered, (0, width - tokens))
    return (candidates.gather(1, order), torch.where(entering, batch_ids[rows], context_ids.gather(1, kept)),
            torch.where(entering, found, positions.gather(1, kept)),
            torch.where(entering[..., None], entered.to(activations.dtype),
                        activations.gather(1, kept[..., None].expand_as(activations))))
