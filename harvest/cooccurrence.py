"""Co-occurrence of dictionary features: how many counted tokens each pair fires on together, counted from the
non-zeros the harvest already has, and each feature's nearest by Jaccard index |A and B| / |A or B|.

Pairs are kept as sorted int64 keys (i * n + j, i < j) with their counts; a batch's pairs wait in a buffer and
are merged in bulk. Memory is bounded by MAX_PAIRS distinct pairs: past it the rarest pairs are dropped (their
counts are then lower bounds and `complete` turns False, recorded with the results); below it every count is
exact.
"""

from __future__ import annotations

import torch

MAX_PAIRS = 8_000_000   # distinct pairs kept: 16 bytes each
FLUSH = 4_000_000       # buffered pair keys before a merge


class CoOccurrence:
    """Pair counts for one source of n features."""

    def __init__(self, n_units: int, max_pairs: int = MAX_PAIRS, flush: int = FLUSH):
        self.n = n_units
        self.max_pairs, self.flush = max_pairs, flush
        self.keys = torch.zeros(0, dtype=torch.int64)
        self.counts = torch.zeros(0, dtype=torch.int64)
        self.firing = torch.zeros(n_units, dtype=torch.int64)
        self.complete = True
        self._pending: list[torch.Tensor] = []
        self._pending_size = 0

    def update(self, nonzeros: torch.Tensor, counted: torch.Tensor) -> None:
        """nonzeros: flat indices into a [positions, n] activation tensor; counted: [positions] bool."""
        nonzeros = nonzeros.to("cpu", torch.int64)
        position, feature = nonzeros // self.n, nonzeros % self.n
        keep = counted.to("cpu")[position]
        position, feature = position[keep], feature[keep]
        order = torch.argsort(position * self.n + feature)
        position, feature = position[order], feature[order]
        self.firing += torch.bincount(feature, minlength=self.n)
        # Each entry pairs with the later entries of its own position (features ascending there).
        _, per_position = torch.unique_consecutive(position, return_counts=True)
        starts = torch.repeat_interleave(torch.cumsum(per_position, 0) - per_position, per_position)
        rank = torch.arange(len(position)) - starts
        partners = torch.repeat_interleave(per_position, per_position) - 1 - rank
        first = torch.repeat_interleave(torch.arange(len(position)), partners)
        offset = torch.arange(len(first)) - torch.repeat_interleave(torch.cumsum(partners, 0) - partners, partners)
        second = first + 1 + offset
        if len(first):
            self._pending.append(feature[first] * self.n + feature[second])
            self._pending_size += len(first)
        if self._pending_size >= self.flush:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        keys, counts = torch.unique(torch.cat(self._pending), return_counts=True)
        self._pending, self._pending_size = [], 0
        keys, inverse = torch.unique(torch.cat([self.keys, keys]), return_inverse=True)
        total = torch.zeros(len(keys), dtype=torch.int64).scatter_add_(0, inverse, torch.cat([self.counts, counts]))
        if len(keys) > self.max_pairs:
            kept = torch.sort(torch.argsort(total, descending=True, stable=True)[:self.max_pairs]).values
            keys, total = keys[kept], total[kept]
            self.complete = False
        self.keys, self.counts = keys, total

    def nearest(self, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, k] indices and Jaccard indices of each feature's nearest, best first (ties: lower feature first);
        -1 and 0 where a feature has fewer than k partners."""
        self._merge()
        i, j = self.keys // self.n, self.keys % self.n
        jaccard = self.counts.double() / (self.firing[i] + self.firing[j] - self.counts).double()
        src, dst, score = torch.cat([i, j]), torch.cat([j, i]), torch.cat([jaccard, jaccard])
        order = torch.argsort(dst, stable=True)
        order = order[torch.argsort(-score[order], stable=True)]
        order = order[torch.argsort(src[order], stable=True)]
        src, dst, score = src[order], dst[order], score[order]
        _, per_unit = torch.unique_consecutive(src, return_counts=True)
        rank = torch.arange(len(src)) - torch.repeat_interleave(torch.cumsum(per_unit, 0) - per_unit, per_unit)
        keep = rank < k
        index = torch.full((self.n, k), -1, dtype=torch.int64)
        scores = torch.zeros((self.n, k), dtype=torch.float64)
        index[src[keep], rank[keep]] = dst[keep]
        scores[src[keep], rank[keep]] = score[keep]
        return index, scores.float()
