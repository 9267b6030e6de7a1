"""Exact top-k max-activating contexts per unit, kept on the model's device and updated batch by batch.

Definition (Neuroscope's): a context's score for a unit is its max activation over the context's positions
(masked positions such as BOS and padding never count); a unit's top-k are the k contexts with the highest
score, ties going to the lower context id, and within a context to the first position reaching the max.
Sparse units (dictionary features) keep only contexts where they fire (score > 0): a feature that fired in three
contexts has three top examples, not three and seventeen where it is zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from featureatlas.harvest.activation_rows import DenseRows, SparseRows
from featureatlas.harvest.batchview import BatchView

Ranks = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # candidate_ranks or sample_ranks, plain or compiled
Step = Callable[..., tuple[torch.Tensor, ...]]  # merge_fixed or reservoir.sample_fixed, plain or compiled


def candidate_ranks(kept_values: torch.Tensor, batch_scores: torch.Tensor, rows: torch.Tensor, units: torch.Tensor,
                    values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each candidate (rows[i], units[i]) scoring values[i]: how many kept contexts of its unit score at least
    as much, and how many contexts of this batch rank above it (higher score, or equal with a lower id)."""
    others, score = batch_scores[units], values[:, None]                                  # [m, batch]
    earlier = torch.arange(others.shape[1], device=rows.device) < rows[:, None]
    among_batch = ((others > score) | ((others == score) & earlier)).sum(dim=1)
    return (kept_values[units] >= score).sum(dim=1), among_batch


def merge_fixed(values: torch.Tensor, context_ids: torch.Tensor, positions: torch.Tensor,
                 activations: torch.Tensor, acts: torch.Tensor, context_max: torch.Tensor, batch_ids: torch.Tensor,
                 counted: torch.Tensor, first: int, padded: bool, largest: bool) -> tuple[torch.Tensor, ...]:
    """TopK.update_fixed's merge as a pure function of tensors (for torch.compile): the new values, context ids,
    positions and rank-ordered activations [units, k, width]."""
    k, (_, tokens, n_units), width = values.shape[1], acts.shape, activations.shape[2]
    batch_scores = context_max.T.float()
    batch_scores = batch_scores.masked_fill(batch_scores.isnan(), float("-inf"))  # a NaN context never enters
    candidates = torch.cat([values, batch_scores], dim=1)                         # [units, k + batch]
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

    def update(self, acts: DenseRows, view: BatchView, context_max: torch.Tensor, largest: bool = True,
               ranks: Ranks = candidate_ranks) -> None:
        """Dense units. acts: the batch's [batch, tokens, units] activations; its context ids are increasing, all
        larger than any seen before. context_max [batch, units]: each context's score (its max over counted
        positions, or minus its min when largest is False, for bottom-k). ranks: candidate_ranks, maybe compiled."""
        scores = context_max.float()
        # Only contexts that beat their unit's current k-th score can enter; a tie with the k-th score loses to
        # it because every kept context has a lower id. Listed row by row: memory order for the gathers.
        rows, units = (scores > self.values[:, -1]).nonzero(as_tuple=True)
        self._merge(acts, view, rows, units, scores[rows, units], scores.T.contiguous(), largest, ranks)

    def update_fixed(self, acts: torch.Tensor, view: BatchView, context_max: torch.Tensor, largest: bool = True,
                     step: Step = merge_fixed) -> None:
        """The same lists with every unit merged every batch, in shapes that never depend on the data: no host
        synchronisation, which a GPU needs (update waits on it for every nonzero). Slots stay in rank order here.
        step: merge_fixed, maybe compiled."""
        self.values, self.context_ids, self.positions, self.slot_activations = step(
            self.values, self.context_ids, self.positions, self.activations(), acts, context_max, view.context_ids,
            view.counted, view.first_counted, view.padded, largest)
        self.slots = torch.arange(self.k, device=acts.device).expand_as(self.values).clone()

    def update_pairs(self, acts: DenseRows | SparseRows, view: BatchView, rows: torch.Tensor, units: torch.Tensor,
                     values: torch.Tensor, ranks: Ranks = candidate_ranks) -> None:
        """Sparse units: only the (batch row, unit) pairs where a unit fires, each with its context max (float32),
        in row-major order."""
        batch_scores = torch.full((self.values.shape[0], acts.shape[0]), float("-inf"), device=values.device)
        batch_scores[units, rows] = values
        enter = values > self.values[units, -1]
        self._merge(acts, view, rows[enter], units[enter], values[enter], batch_scores, True, ranks)

    def _merge(self, acts: DenseRows | SparseRows, view: BatchView, rows: torch.Tensor, units: torch.Tensor,
               values: torch.Tensor, batch_scores: torch.Tensor, largest: bool, ranks: Ranks) -> None:
        """Candidate (batch row, unit) pairs, row-major, with their float32 scores; batch_scores [units, batch]:
        every context's score (-inf where none). A candidate's new rank is the number of kept contexts scoring at
        least as much plus the number of this batch's contexts ranked above it, so no list is sorted."""
        if units.numel() == 0:
            return
        k, device = self.k, units.device
        among_kept, among_batch = ranks(self.values, batch_scores, rows, units, values)
        rank = among_kept + among_batch
        enter = rank < k
        rows, units, values = rows[enter], units[enter], values[enter]
        among_kept, among_batch, rank = among_kept[enter], among_batch[enter], rank[enter]
        # Kept context j moves down by the entering contexts that score above it and drops out past k - 1: a
        # unit's last n_entering ones, whose slots its entering contexts take, best first.
        ahead = torch.zeros((self.values.shape[0], k + 1), dtype=torch.int64, device=device)
        ahead.index_put_((units, among_kept), torch.ones_like(units), accumulate=True)
        moved = (torch.arange(k, device=device) + ahead[:, :k].cumsum(dim=1)).clamp_(max=k)  # k: dropped
        slots = self.slots[units, k - ahead.sum(dim=1)[units] + among_batch]
        entering_acts = acts(rows, units)                                        # [m, tokens]
        for name, new in (("values", values), ("context_ids", view.context_ids[rows]),
                          ("positions", extreme_positions(entering_acts, rows, view, largest)), ("slots", slots)):
            table = getattr(self, name)
            merged = torch.empty((table.shape[0], k + 1), dtype=table.dtype, device=device)
            merged.scatter_(1, moved, table)
            merged[units, rank] = new
            setattr(self, name, merged[:, :k].contiguous())
        tokens, width = acts.shape[1], self.slot_activations.shape[2]
        if tokens < width:
            entering_acts = torch.nn.functional.pad(entering_acts, (0, width - tokens))
        self.slot_activations[units, slots] = entering_acts.to(self.slot_activations.dtype)

    def check_state(self) -> None:
        """Raises ValueError unless each unit's slots are a permutation of 0..k-1: updates write through them (the
        native loops with raw pointers), and restored state may come from a tampered checkpoint."""
        ranks = torch.arange(self.k, device=self.slots.device).expand_as(self.slots)
        if not torch.equal(self.slots.sort(dim=1).values, ranks):
            raise ValueError(f"top-k slots are not each unit's permutation of 0..{self.k - 1}")

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
