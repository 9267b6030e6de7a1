"""Per-unit statistics over every counted token: count, firing count, sum, sum of squares, min, max, histogram.

Histogram bins are fixed (schema.sql's `histograms` view documents them): 4 an octave of |activation| from 2^-16
to 2^16, each side of zero, read straight off the float's exponent and top two mantissa bits, so counting needs
no search and histograms of shards simply add. Dense sources (neurons, residual dimensions) count every token of
one context in `histogram_every`, chosen by the seeded sampling key; sparse ones (dictionary features) count
every token, touching only the non-zero activations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from featureatlas.harvest.batchview import BatchView
from featureatlas.store.schema import HISTOGRAM_HALF

HALF = HISTOGRAM_HALF      # bins each side of zero; column HALF + b of the counts holds bin b
N_BINS = 2 * HALF + 1
_SHIFT_TO_CODE = 21        # float32 bits >> 21 = sign, 8 exponent bits, 2 mantissa bits
FIRST_CODE = 442          # code of 2^-16 is 444, which is bin 2


def histogram_columns(x: torch.Tensor) -> torch.Tensor:
    """The histogram column of every value (int64, same shape), from its sign, exponent and top mantissa bits."""
    if x.dtype == torch.bfloat16:  # bfloat16 is the top half of a float32: same code, 16 bits further right
        raw = (x.view(torch.int16) >> (_SHIFT_TO_CODE - 16)).to(torch.int64)
    else:
        raw = (x.float().contiguous().view(torch.int32) >> _SHIFT_TO_CODE).to(torch.int64)
    code = raw & 1023  # without the sign; 0 is zero (or a value too small to have a bin of its own)
    magnitude = torch.where(code == 0, 0, (code - FIRST_CODE).clamp(1, HALF))
    return HALF + torch.where(raw < 0, -magnitude, magnitude)


def counted_columns(acts: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """[rows x tokens, units]: each activation's histogram column, N_BINS (the uncounted row) where not counted."""
    columns = torch.where(counted[..., None], histogram_columns(acts), N_BINS)
    return columns.reshape(-1, acts.shape[-1])


Columns = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # counted_columns, plain or compiled


class Statistics:
    STATE = ("n_tokens", "n_firing", "sum", "sum_squares", "min", "max", "counts")  # what a checkpoint saves

    def __init__(self, n_units: int, device: torch.device, sparse: bool, histogram_every: int = 1):
        self.sparse = sparse
        self.histogram_every = 1 if sparse else histogram_every
        self.n_tokens = 0
        self.n_firing = torch.zeros(n_units, dtype=torch.int64, device=device)
        self.sum = torch.zeros(n_units, dtype=torch.float64, device=device)
        self.sum_squares = torch.zeros(n_units, dtype=torch.float64, device=device)
        self.min = torch.full((n_units,), float("inf"), device=device)
        self.max = torch.full((n_units,), float("-inf"), device=device)
        self.counts = torch.zeros(N_BINS + 1, n_units, dtype=torch.int64, device=device)  # last row: not counted
        self._ones = torch.ones(1, 1, dtype=torch.int64, device=device)

    def update(self, context_max: torch.Tensor, context_min: torch.Tensor, sums: list[torch.Tensor]) -> None:
        """Dense units, all but the histogram (counted apart, see count_histogram). context_max/min [batch, units]
        over counted positions only; sums: the counted tokens' sum, sum of squares and firing count per unit
        (reductions.py). Tensors only (see count)."""
        self.sum += sums[0]
        self.sum_squares += sums[1]
        self.n_firing += sums[2]
        self._update_extremes(context_max.amax(dim=0), context_min.amin(dim=0))

    def count_histogram(self, acts: torch.Tensor, batch: BatchView, columns: Columns = counted_columns) -> None:
        """Dense units' histogram: every counted token of the contexts whose key is a multiple of histogram_every.
        columns: counted_columns, maybe compiled."""
        rows = (batch.keys % self.histogram_every == 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        found = columns(acts[rows], batch.counted[rows])
        self.counts.scatter_add_(0, found, self._ones.expand_as(found))

    def count_histogram_fixed(self, acts: torch.Tensor, batch: BatchView, columns: Columns = counted_columns
                              ) -> None:
        """The same counts from every context, the unsampled ones sent to the uncounted row: no host
        synchronisation (see TopK.update_fixed)."""
        sampled = batch.keys % self.histogram_every == 0
        found = columns(acts, batch.counted & sampled[:, None])
        self.counts.scatter_add_(0, found, self._ones.expand_as(found))

    def update_sparse(self, batch: BatchView, units: torch.Tensor, values: torch.Tensor) -> None:
        """Sparse units: only the counted non-zero activations (units[i] has values[i]); zeros are implied by
        n_tokens (see count)."""
        values = values.float()
        self.sum.index_add_(0, units, values.double())
        self.sum_squares.index_add_(0, units, values.double().square())
        self.n_firing.index_add_(0, units, (values > 0).long())
        flat = histogram_columns(values) * self.counts.shape[1] + units
        self.counts.view(-1).index_add_(0, flat, self._ones.view(1).expand_as(flat))
        n = self.max.numel()
        high = torch.full((n,), float("-inf"), device=values.device).scatter_reduce_(0, units, values, "amax")
        low = torch.full((n,), float("inf"), device=values.device).scatter_reduce_(0, units, values, "amin")
        with_zero = torch.bincount(units, minlength=n) < batch.n_counted  # a counted token where it is zero
        self._update_extremes(torch.where(with_zero, high.clamp(min=0), high),
                              torch.where(with_zero, low.clamp(max=0), low))

    def count(self, batch: BatchView) -> None:
        """The batch's counted tokens, apart from the tensor updates: a CUDA graph cannot replay Python (graphs.py)."""
        self.n_tokens += batch.n_counted

    def _update_extremes(self, batch_max: torch.Tensor, batch_min: torch.Tensor) -> None:
        torch.maximum(self.max, batch_max.float(), out=self.max)
        torch.minimum(self.min, batch_min.float(), out=self.min)

    def finish(self) -> dict[str, torch.Tensor]:
        """Per-unit arrays for the store; a sparse source's zeros are every counted token it did not fire on."""
        counts = self.counts[:N_BINS].T.clone()  # [units, bins]
        if self.sparse:
            counts[:, HALF] += self.n_tokens - counts.sum(dim=1)
        # min and max come from every counted token's context extremes, zeros included; NaN if none was seen
        minimum, maximum = (t if self.n_tokens else torch.full_like(t, float("nan")) for t in (self.min, self.max))
        return {"n_firing": self.n_firing, "sum_activation": self.sum, "sum_squares": self.sum_squares,
                "min_activation": minimum, "max_activation": maximum, "counts": counts}
