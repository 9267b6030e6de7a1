"""Co-occurrence of dictionary features: how many counted tokens each pair fires on together, counted from the
non-zeros the harvest already has, and each feature's nearest by Jaccard index |A and B| / |A or B|.

Pairs are kept as sorted int64 keys (i * n + j, i < j) with their counts; a batch's pairs wait in a buffer and
are merged in bulk. A token where c features fire makes c(c - 1)/2 pairs (a top-k SAE with k = 32: 496), made a
slice of the batch at a time so that a batch never holds more than `flush` of them. Memory is bounded by
`max_pairs` distinct pairs: past it the rarest pairs are dropped (their counts are then lower bounds and
`complete` turns False, recorded with the run's settings); below it every count is exact. The buffer is part of
the saved state, so update's merges happen at the same points with or without a checkpoint and resume.

On a GPU, update_dense counts from the encode's dense output without waiting for the host: each batch's firing
tokens' features compacted into room of a size the host knows, their pairs written to a device buffer at offsets
the device works out, the buffer merged (the one wait) only when it could be full. Where the encode keeps at most k
features a token (top-k dictionaries) k sizes the room; for any other it is sized from the batches seen. Each
batch's fit is checked one batch later, when the device is long done with it: a batch that did not fit is counted
again the exact way (update), and the room grown. The counts are update's either way.
"""

from __future__ import annotations

import torch

MAX_PAIRS = 8_000_000   # distinct pairs kept: 16 bytes each
FLUSH = 4_000_000       # buffered pair keys before a merge; also the most pairs one slice of a batch makes
BUFFERED = 8            # update_dense's device buffer holds this many times `flush` keys


class CoOccurrence:
    """Pair counts for one source of n features, on the harvest's device."""

    # What a checkpoint saves, pending first: reading it settles update_dense's last batch, which may merge.
    STATE = ("pending", "keys", "counts", "firing", "complete")
    RESIZABLE = ("keys", "counts", "pending")  # their length depends on the data: restored whole, then checked

    def __init__(self, n_units: int, max_pairs: int | None = None, flush: int | None = None,
                 device: torch.device | str = "cpu"):
        self.n = n_units
        self.max_pairs = MAX_PAIRS if max_pairs is None else max_pairs  # read here: tests make them small
        self.flush = FLUSH if flush is None else flush
        self.device = torch.device(device)
        self.keys = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.counts = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.firing = torch.zeros(n_units, dtype=torch.int64, device=self.device)
        self.complete = True
        self._pending: list[torch.Tensor] = []
        self._pending_size = 0
        self._buffer: torch.Tensor | None = None  # update_dense's pair keys, written on the device
        self._written: torch.Tensor | None = None  # how many of them (a device scalar)
        self._bound = 0                            # at most that many (known to the host)
        self._room = (0, 0)        # update_dense: firing entries and pairs a batch has room for
        self._unchecked: tuple | None = None       # update_dense's last batch, its fit not read yet

    @property
    def pending(self) -> torch.Tensor:
        """The buffered pair keys not merged yet (one tensor)."""
        self.settle()
        self._drain()
        if len(self._pending) != 1:
            self._pending = [torch.cat(self._pending) if self._pending else self.keys[:0]]
        return self._pending[0]

    @pending.setter
    def pending(self, value: torch.Tensor) -> None:
        self._pending, self._pending_size = [value], len(value)

    def update(self, nonzeros: torch.Tensor, counted: torch.Tensor) -> None:
        """nonzeros: flat indices (unique, any order) into a [positions, n] activation tensor, which a
        [batch, tokens, n] one is too; counted: [positions] bool (or [batch, tokens]): BOS and padding do not."""
        n = self.n
        flat = nonzeros.to(self.device, torch.int64)
        flat = flat[counted.reshape(-1).to(self.device)[flat // n]].sort().values  # by position, then feature
        feature = flat % n
        self.firing += torch.bincount(feature, minlength=n)
        if not len(flat):
            return
        _, per_position = torch.unique_consecutive(flat // n, return_counts=True)
        # Each entry pairs with the later entries of its own position (features ascending there), a slice of
        # entries making at most `flush` pairs (at least one entry) at a time.
        device = self.device
        starts = torch.repeat_interleave(torch.cumsum(per_position, 0) - per_position, per_position)
        rank = torch.arange(len(feature), device=device) - starts
        partners = torch.repeat_interleave(per_position, per_position) - 1 - rank
        ends = torch.cumsum(partners, 0)  # pairs made by entries up to and including each one
        entry, made, total = 0, 0, int(ends[-1])
        while made < total:
            stop = max(int(torch.searchsorted(ends, made + self.flush, right=True)), entry + 1)
            part = partners[entry:stop]
            first = torch.repeat_interleave(torch.arange(entry, stop, device=device), part)
            offset = torch.arange(len(first), device=device) - torch.repeat_interleave(
                torch.cumsum(part, 0) - part, part)
            self._push(feature[first] * n + feature[first + 1 + offset])
            entry, made = stop, int(ends[stop - 1])

    def update_dense(self, acts: torch.Tensor, counted: torch.Tensor, most: int | None = None) -> None:
        """update's counts from acts [batch, tokens, n], the encode's dense output (most: the encode keeps at most
        that many features a token), without waiting for the host (see the module's docstring)."""
        self.settle()
        n = self.n
        fires = (acts.reshape(-1, n) != 0) & counted.reshape(-1, 1).to(acts.device)  # NaN fires, as in update
        per_token = fires.sum(1)
        total, pairs = per_token.sum(), (per_token * (per_token - 1) // 2).sum()
        if most is not None:
            most = min(most, n)
            self._room = (len(per_token) * most, len(per_token) * most * (most - 1) // 2)
        entries, made = self._room
        fits = (total <= entries) & (pairs <= made)
        self.firing += fires.sum(0) * fits
        flat = torch.nonzero_static(fires.reshape(-1), size=entries).squeeze(1)  # features ascending per token
        entry = torch.arange(entries, device=flat.device)
        live = entry < total
        position, feature = torch.where(live, flat // n, 0), torch.where(live, flat % n, 0)
        firsts = torch.cumsum(per_token, 0) - per_token
        partners = torch.where(live, per_token[position] - 1 - (entry - firsts[position]), 0)
        ends = torch.cumsum(partners, 0)  # pairs made by entries up to and including each one
        for start in range(0, made, self.flush):  # pair p: entry i's (p - its first pair)-th later partner
            p = torch.arange(start, min(start + self.flush, made), device=flat.device)
            i = torch.searchsorted(ends, p, right=True).clamp_(max=max(entries - 1, 0))
            j = (i + 1 + p - (ends[i] - partners[i])).clamp_(max=max(entries - 1, 0))
            self._write(feature[i] * n + feature[j], (p < pairs) & fits)
        self._unchecked = (fires, counted, _to_host(torch.stack([total, pairs, fits.long()])))

    def settle(self) -> None:
        """update_dense's last batch checked (it may wait for the device, which is long done with it): counted
        again through update where it did not fit its room, the room grown. Done before each batch and before
        the state is read."""
        if self._unchecked is None:
            return
        fires, counted, (values, done) = self._unchecked
        self._unchecked = None
        if done is not None:
            done.synchronize()
        total, pairs, fits = values.tolist()
        if not fits:
            self._room = (max(self._room[0], _room_for(total)), max(self._room[1], _room_for(pairs)))
            self._drain()  # the batches before it first, in order
            self.update(fires.reshape(-1).nonzero().squeeze(1), counted)

    def _write(self, keys: torch.Tensor, valid: torch.Tensor) -> None:
        """The valid keys into the buffer after those written, at offsets the device works out (the rest to a
        slot past its end); merged first where the buffer could overflow."""
        if self._written is None:
            self._written = torch.zeros((), dtype=torch.int64, device=self.device)
        if self._bound and self._bound + len(keys) > BUFFERED * self.flush:
            self._merge()
        size = self._bound + len(keys)  # grown as the host's bound needs, by doubling: never read back to size it
        if self._buffer is None or len(self._buffer) <= size:
            grown = torch.empty(max(size, min(2 * size, BUFFERED * self.flush)) + 1, dtype=torch.int64,
                                device=self.device)
            if self._buffer is not None and self._bound:
                grown[:self._bound] = self._buffer[:self._bound]
            self._buffer = grown
        dump = len(self._buffer) - 1
        at = torch.cumsum(valid, 0) + (self._written - 1)
        self._buffer.index_put_((torch.where(valid, at, dump),), keys.to(self.device))
        self._written += valid.sum()
        self._bound += len(keys)

    def _drain(self) -> None:
        """update_dense's buffer into the pending keys (this waits for the host: only before a merge, or where
        the state is read)."""
        if self._bound:
            assert self._buffer is not None and self._written is not None
            written = int(self._written)  # a new zero: the count may be an inference tensor, read outside one
            self._bound, self._written = 0, torch.zeros_like(self._written)
            if written:
                self._pending.append(self._buffer[:written].clone())
                self._pending_size += written

    def _push(self, keys: torch.Tensor) -> None:
        if len(keys):
            self._pending.append(keys)
            self._pending_size += len(keys)
        if self._pending_size >= self.flush:
            self._merge()

    def _merge(self) -> None:
        """The buffer's pairs into the sorted lists: counts of known pairs added where they are, new pairs
        placed by searchsorted (no sort of the whole list); past max_pairs the rarest dropped."""
        self._drain()
        if not self._pending_size:
            self._pending = []
            return
        new, new_counts = torch.unique(torch.cat(self._pending), return_counts=True)
        self._pending, self._pending_size = [], 0
        keys, counts = self.keys, self.counts.clone()
        at = torch.searchsorted(keys, new)
        known = at < len(keys)
        known[known.clone()] = keys[at[known]] == new[known]
        counts.index_add_(0, at[known], new_counts[known])
        fresh, fresh_at = new[~known], at[~known]
        size = len(keys) + len(fresh)
        merged_keys = torch.empty(size, dtype=torch.int64, device=self.device)
        merged_counts = torch.empty(size, dtype=torch.int64, device=self.device)
        old_places = torch.arange(len(keys), device=self.device) + torch.searchsorted(fresh, keys)
        fresh_places = fresh_at + torch.arange(len(fresh), device=self.device)
        merged_keys[old_places], merged_counts[old_places] = keys, counts
        merged_keys[fresh_places], merged_counts[fresh_places] = fresh, new_counts[~known]
        if size > self.max_pairs:
            merged_keys, merged_counts = self._rarest_dropped(merged_keys, merged_counts)
        self.keys, self.counts = merged_keys, merged_counts

    def _rarest_dropped(self, keys: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The max_pairs most frequent pairs, in key order; of pairs as frequent as the last one kept, the lower
        keys stay. Their counts, and later ones of the dropped pairs, are lower bounds from here on."""
        self.complete = False
        drop = len(keys) - self.max_pairs
        threshold = torch.kthvalue(counts.cpu(), drop).values.item()  # the drop-th smallest count
        keep = counts > threshold
        tied = torch.nonzero(counts == threshold).squeeze(1)
        keep[tied[:len(tied) - (drop - int((counts < threshold).sum()))]] = True
        return keys[keep], counts[keep]

    def check_state(self) -> None:
        """Raises ValueError where restored state (a checkpoint may have been tampered with) is not counts this
        class could have made: keys sorted, distinct pairs i < j of n features, counts at most each one's firing."""
        n, keys, counts, pending = self.n, self.keys, self.counts, self.pending
        if keys.dim() != 1 or counts.shape != keys.shape or pending.dim() != 1 or self.firing.shape != (n,):
            raise ValueError("co-occurrence keys, counts or firing have the wrong shape")
        if len(keys) > self.max_pairs or len(pending) >= (BUFFERED + 1) * self.flush + n * n:
            raise ValueError(f"co-occurrence holds more than {self.max_pairs:,} pairs")
        for name, values in (("keys", keys), ("pending", pending)):
            i, j = values // n, values % n
            if len(values) and not (bool((values >= 0).all()) and bool((i < j).all()) and bool((i < n).all())):
                raise ValueError(f"co-occurrence {name} are not pairs i < j of {n} features")
        if len(keys) and not bool((keys[1:] > keys[:-1]).all()):
            raise ValueError("co-occurrence keys are not sorted and distinct")
        if bool((self.firing < 0).any()) or (len(counts) and not (
                bool((counts > 0).all()) and bool((counts <= torch.minimum(self.firing[keys // n],
                                                                           self.firing[keys % n])).all()))):
            raise ValueError("co-occurrence counts exceed their features' firing counts")

    def nearest(self, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, k] indices and Jaccard indices of each feature's nearest, best first (ties: lower feature first),
        on the CPU; -1 and 0 where a feature has fewer than k partners."""
        self.settle()
        self._merge()
        keys, counts, firing = self.keys.cpu(), self.counts.cpu(), self.firing.cpu()
        i, j = keys // self.n, keys % self.n
        jaccard = counts.double() / (firing[i] + firing[j] - counts).double()
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


def _room_for(count: int) -> int:
    """Room for `count` with a quarter to spare: batches vary by less, so the room rarely grows again (and the
    buffer, filled by the room's pairs a batch, is merged little more often than the pairs need)."""
    return count + (count + 3) // 4


def _to_host(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """values copied to the host without waiting, and the event that marks them there (None: already there)."""
    if values.device.type != "cuda":
        return values, None
    copied = values.to("cpu", non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return copied, done
