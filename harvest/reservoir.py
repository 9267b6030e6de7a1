"""Uniform random samples of contexts per unit, by interval of the context's max: quantile and random examples.

Each context has a seeded random key (store/sampling.py); a bin's sample is the n contexts with the
smallest keys among those whose max falls in it, which is a uniform sample without replacement that does not
depend on the order contexts arrive in. Intervals split [0, W) into `n_bins` equal parts, where W is the
smallest power of two above the unit's max so far; when the max outgrows W, W doubles and bins merge in pairs
(the smallest keys of a union are among the smallest keys of its parts), so the final samples are exactly those
of the final W, whatever the order. With n_bins = 1 the one bin is every context where the unit fires.
"""

from __future__ import annotations

import torch

from featureatlas.harvest.activation_rows import DenseRows, SparseRows
from featureatlas.harvest.batchview import BatchView
from featureatlas.harvest.topk import Ranks, Step, extreme_positions

_NO_KEY = torch.iinfo(torch.int64).max
_NO_EXPONENT = -(2**20)  # W = 2^exponent; a unit that never fired has none
_MIN_EXPONENT, _MAX_EXPONENT = -148, 128  # frexp's exponents of positive float32s (the least subnormal to the max)


def candidates(context_max: torch.Tensor, exponent: torch.Tensor, keys: torch.Tensor, batch_keys: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, units]: whether each context may enter its unit's sample (it fires, and its key beats the largest
    kept key of its bin), and its bin."""
    n_units, n_bins = keys.shape[:2]
    if n_bins == 1:
        worst = keys.amax(dim=(1, 2))[None, :]
        bins = torch.zeros((1, 1), dtype=torch.int64, device=keys.device).expand(context_max.shape)
    else:  # units that never fired have no W: their scale stays finite (0 * 2^big is NaN on CUDA)
        bins = _bin(context_max, (-exponent).clamp(max=126)[None, :], n_bins)
        units = torch.arange(n_units, device=keys.device)
        worst = keys.amax(dim=2).view(-1).take(units * n_bins + bins)
    return (context_max > 0) & (batch_keys[:, None] < worst), bins


def sample_ranks(kept_keys: torch.Tensor, batch_bins: torch.Tensor, batch_keys: torch.Tensor, rows: torch.Tensor,
                 units: torch.Tensor, bins: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each candidate: how many kept contexts of its bin have smaller keys, and how many of this batch's
    candidates for that bin do (equal keys, vanishingly rare, go to the lower row)."""
    among_kept = (kept_keys[units, bins] < keys[:, None]).sum(dim=1)
    others = batch_keys[None, :]
    earlier = torch.arange(others.shape[1], device=rows.device) < rows[:, None]
    smaller = (others < keys[:, None]) | ((others == keys[:, None]) & earlier)
    return among_kept, ((batch_bins[units] == bins[:, None]) & smaller).sum(dim=1)


def sample_fixed(exponent: torch.Tensor, keys: torch.Tensor, context_ids: torch.Tensor, positions: torch.Tensor,
                  values: torch.Tensor, activations: torch.Tensor, acts: torch.Tensor, context_max: torch.Tensor,
                  batch_keys: torch.Tensor, batch_ids: torch.Tensor, counted: torch.Tensor, first: int,
                  padded: bool) -> tuple[torch.Tensor, ...]:
    """Reservoir.update_fixed's step as a pure function of tensors (for torch.compile): per (unit, bin), the
    smallest keys among the kept contexts and every firing context of the batch. A larger W re-bins the kept
    contexts by their max, which is exactly what merging bins in pairs does. Returns the new STATE tensors."""
    n_units, n_bins, per = keys.shape
    (batch_size, tokens, _), slots, width = acts.shape, n_bins * per, activations.shape[-1]
    context_max = context_max.float()
    if n_bins > 1:
        batch_max = context_max.amax(dim=0)
        _, grown = torch.frexp(batch_max)
        exponent = torch.maximum(exponent, torch.where(batch_max > 0, grown.long(), _NO_EXPONENT))
        scale = (-exponent).clamp(max=126)[:, None]  # never-fired units: finite, not 2^(2^20)
        bins = torch.cat([_bin(values.view(n_units, slots), scale, n_bins), _bin(context_max.T, scale, n_bins)], 1)
    else:
        bins = torch.zeros((n_units, slots + batch_size), dtype=torch.int64, device=acts.device)
    pool = torch.cat([keys.view(n_units, slots), torch.where(context_max.T > 0, batch_keys[None, :], _NO_KEY)], 1)
    in_bin = bins[:, None, :] == torch.arange(n_bins, device=acts.device)[None, :, None]
    chosen_keys, chosen = torch.where(in_bin, pool[:, None, :], _NO_KEY).topk(per, dim=2, largest=False)
    chosen_keys, chosen = chosen_keys.reshape(n_units, slots), chosen.reshape(n_units, slots)
    empty, from_batch = chosen_keys == _NO_KEY, chosen >= slots
    kept, rows = chosen.clamp(max=slots - 1), (chosen - slots).clamp(min=0)
    entered = acts[rows, :, torch.arange(n_units, device=acts.device)[:, None]]      # [units, slots, tokens]
    scores = entered[:, :, first:]
    if padded:
        scores = scores.masked_fill(~counted[rows, first:], float("-inf"))
    found = scores.argmax(dim=2) + first
    if tokens < width:
        entered = torch.nn.functional.pad(entered, (0, width - tokens))

    def pick(table: torch.Tensor, new: torch.Tensor, name: str) -> torch.Tensor:
        value = torch.where(from_batch, new, table.view(n_units, slots).gather(1, kept))
        return torch.where(empty, _empty(name), value).view(n_units, n_bins, per)

    previous = activations.view(n_units, slots, width)
    tokens_kept = torch.where(from_batch[..., None], entered.to(previous.dtype),
                              previous.gather(1, kept[..., None].expand(-1, -1, width)))
    return (exponent, chosen_keys.view(n_units, n_bins, per), pick(context_ids, batch_ids[rows], "context_ids"),
            pick(positions, found, "positions"), pick(values, context_max.T.gather(1, rows), "values"),
            torch.where(empty[..., None], 0, tokens_kept).view(n_units, n_bins, per, width))


class Reservoir:
    STATE = ("exponent", "keys", "context_ids", "positions", "values", "activations")  # what a checkpoint saves

    def __init__(self, n_units: int, n_bins: int, per_bin: int, context_length: int, device: torch.device,
                 activation_dtype: torch.dtype):
        if n_bins > 1 and n_bins % 2:
            raise ValueError("n_bins must be even, so that bins merge in pairs when the range doubles")
        self.n_bins, self.per_bin = n_bins, per_bin
        shape = (n_units, n_bins, per_bin)
        self.exponent = torch.full((n_units,), _NO_EXPONENT, dtype=torch.int64, device=device)
        self.keys = torch.full(shape, _NO_KEY, dtype=torch.int64, device=device)
        self.context_ids = torch.full(shape, -1, dtype=torch.int64, device=device)
        self.positions = torch.zeros(shape, dtype=torch.int64, device=device)
        self.values = torch.zeros(shape, device=device)
        self.activations = torch.zeros((*shape, context_length), dtype=activation_dtype, device=device)

    def update(self, acts: DenseRows, batch: BatchView, context_max: torch.Tensor, ranks: Ranks = sample_ranks
               ) -> None:
        """Dense units. acts: the batch's [batch, tokens, units] activations; context_max [batch, units] as for
        TopK.update. The candidates are found on the [batch, units] matrix, then listed row by row. ranks:
        sample_ranks, maybe compiled."""
        context_max = context_max.float()
        if self.n_bins > 1:
            self._grow(context_max.amax(dim=0))
        candidate, bins = candidates(context_max, self.exponent, self.keys, batch.keys)
        rows, units = candidate.nonzero(as_tuple=True)
        self._enter(acts, batch, rows, units, bins[rows, units], context_max[rows, units], ranks)

    def update_fixed(self, acts: torch.Tensor, batch: BatchView, context_max: torch.Tensor,
                     step: Step = sample_fixed) -> None:
        """The same samples in shapes that never depend on the data (no host synchronisation: see TopK).
        step: sample_fixed, maybe compiled."""
        (self.exponent, self.keys, self.context_ids, self.positions, self.values, self.activations) = \
            step(self.exponent, self.keys, self.context_ids, self.positions, self.values, self.activations, acts,
                 context_max.float(), batch.keys, batch.context_ids, batch.counted, batch.first_counted,
                 batch.padded)

    def update_pairs(self, acts: DenseRows | SparseRows, batch: BatchView, rows: torch.Tensor, units: torch.Tensor,
                     values: torch.Tensor, batch_max: torch.Tensor, ranks: Ranks = sample_ranks) -> None:
        """Sparse units. rows/units/values: every (batch row, unit) pair where the unit fires (context max > 0,
        float32), row-major; batch_max [units]: each unit's max over the batch."""
        if units.numel() == 0:
            return
        if self.n_bins > 1:
            self._grow(batch_max.float())
            bins = _bin(values, -self.exponent[units], self.n_bins)
        else:
            bins = torch.zeros_like(units)
        # Candidates: contexts whose key beats the largest kept key of their unit's bin (few, once bins fill).
        candidate = batch.keys[rows] < self.keys.amax(dim=2)[units, bins]
        self._enter(acts, batch, rows[candidate], units[candidate], bins[candidate], values[candidate], ranks)

    def _enter(self, acts: DenseRows | SparseRows, batch: BatchView, rows: torch.Tensor, units: torch.Tensor,
               bins: torch.Tensor, values: torch.Tensor, ranks: Ranks) -> None:
        """Candidate (batch row, unit) pairs, row-major, with their bins and context max. A candidate enters when
        fewer than per_bin contexts of its bin have smaller keys, kept ones and this batch's candidates together:
        no rounds, no sorting."""
        if units.numel() == 0:
            return
        keys = batch.keys[rows]
        batch_bins = torch.full((self.keys.shape[0], acts.shape[0]), -1, dtype=torch.int16, device=units.device)
        batch_bins[units, rows] = bins.to(torch.int16)  # every candidate's bin, -1 elsewhere (n_bins < 2^15)
        among_kept, among_batch = ranks(self.keys, batch_bins, batch.keys, rows, units, bins, keys)
        enter = among_kept + among_batch < self.per_bin
        rows, units, bins, values = rows[enter], units[enter], bins[enter], values[enter]
        keys, among_batch = keys[enter], among_batch[enter]
        if units.numel() == 0:
            return
        # A bin's e entering contexts (among_batch 0 .. e-1) take the slots of its e largest kept keys (an empty
        # slot's key is the largest).
        group = units * self.n_bins + bins
        n_entering = torch.bincount(group, minlength=self.keys.shape[0] * self.n_bins)[group]
        by_key = self.keys[units, bins].argsort(dim=1)
        slot = by_key.gather(1, (self.per_bin - n_entering + among_batch)[:, None]).squeeze(1)
        tokens = acts(rows, units)
        width = self.activations.shape[-1]
        self.keys[units, bins, slot] = keys
        self.values[units, bins, slot] = values
        self.context_ids[units, bins, slot] = batch.context_ids[rows]
        self.positions[units, bins, slot] = extreme_positions(tokens, rows, batch)
        if tokens.shape[1] < width:
            tokens = torch.nn.functional.pad(tokens, (0, width - tokens.shape[1]))
        self.activations[units, bins, slot] = tokens.to(self.activations.dtype)

    def _grow(self, batch_max: torch.Tensor) -> None:
        """Raise W to the smallest power of two above each unit's max, merging bins in pairs per doubling."""
        _, exponent = torch.frexp(batch_max)  # batch_max = m * 2^exponent with 0.5 <= m < 1: below 2^exponent
        needed = torch.where(batch_max > 0, exponent.long(), _NO_EXPONENT)
        grow = needed > self.exponent
        if not bool(grow.any()):
            return
        units = grow.nonzero().squeeze(1)
        fired_before = self.exponent[units] != _NO_EXPONENT
        doublings = (needed[units] - self.exponent[units]).clamp(max=64)
        self.exponent[units] = needed[units]
        units, doublings = units[fired_before], doublings[fired_before]
        while units.numel():
            self._merge_pairs(units)
            doublings -= 1
            more = doublings > 0
            units, doublings = units[more], doublings[more]

    def _merge_pairs(self, units: torch.Tensor) -> None:
        """Bins (2i, 2i+1) become bin i, keeping the smallest keys; the upper half becomes empty."""
        n, half, per = units.numel(), self.n_bins // 2, self.per_bin
        keys = self.keys[units].reshape(n, half, 2 * per)
        order = keys.argsort(dim=2, stable=True)[:, :, :per]
        for name in ("keys", "context_ids", "positions", "values"):
            table = getattr(self, name)
            merged = table[units].reshape(n, half, 2 * per).gather(2, order)
            table[units] = torch.cat([merged, torch.full_like(merged, _empty(name))], dim=1)
        acts = self.activations[units].reshape(n, half, 2 * per, -1)
        merged = acts.gather(2, order[..., None].expand(-1, -1, -1, acts.shape[-1]))
        self.activations[units] = torch.cat([merged, torch.zeros_like(merged)], dim=1)

    def check_state(self) -> None:
        """Raises ValueError unless every W is one a float32 max can give (or none): bins are computed from it
        (by the native loops into raw pointers), and restored state may come from a tampered checkpoint."""
        known = (self.exponent >= _MIN_EXPONENT) & (self.exponent <= _MAX_EXPONENT)
        if not bool((known | (self.exponent == _NO_EXPONENT)).all()):
            raise ValueError(f"sample exponents outside [{_MIN_EXPONENT}, {_MAX_EXPONENT}]")

    def intervals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[units, n_bins] lower and upper edges of each bin (NaN for units that never fired)."""
        width = torch.ldexp(torch.ones_like(self.exponent, dtype=torch.float32), self.exponent) / self.n_bins
        width = torch.where(self.exponent == _NO_EXPONENT, float("nan"), width)
        steps = torch.arange(self.n_bins, device=width.device)
        return width[:, None] * steps, width[:, None] * (steps + 1)

    def referenced_context_ids(self) -> torch.Tensor:
        ids = self.context_ids.unique()
        return ids[ids >= 0]



def _bin(values: torch.Tensor, scale: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Interval of each context max under W = 2^-scale (anything at or below 0, and NaN, lands in bin 0: never
    kept). values x 2^scale in two exact steps of a power of two each (torch.ldexp is a pow, slow and unfused)."""
    half = torch.div(scale, 2, rounding_mode="floor")
    scaled = values * _power_of_two(half) * _power_of_two(scale - half)
    return (scaled * n_bins).floor_().nan_to_num_(nan=0.0).clamp_(0, n_bins - 1).long()


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2.0^exponent as float32, built from its bits (exponent within [-126, 127])."""
    return ((exponent + 127) << 23).to(torch.int32).view(torch.float32)


def _empty(name: str) -> int:
    return {"keys": _NO_KEY, "context_ids": -1}.get(name, 0)
