"""The per-token activations of chosen (batch row, unit) pairs: what every kept example stores.

Dense units gather them from the [batch, tokens, units] activations. For sparse units (dictionary features)
that gather is a cache miss per token, tens of thousands of rows a batch while the lists fill, so their rows are
rebuilt from the batch's non-zeros instead: one pass over those, whatever the number of rows asked for.
"""

from __future__ import annotations

import torch


class DenseRows:
    def __init__(self, acts: torch.Tensor):
        self.acts = acts
        self.shape = acts.shape
        self.dtype = acts.dtype

    def __call__(self, rows: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """[m, tokens]: row i is unit units[i] over the tokens of batch row rows[i]."""
        return self.acts[rows, :, units]


class SparseRows:
    """The same rows from flat non-zero indices (every position: BOS and padding are shown, if not counted)."""

    def __init__(self, acts: torch.Tensor, nonzeros: torch.Tensor, table: torch.Tensor):
        """table: int32 scratch of at least batch x units entries, all -1, left as it was found."""
        self.shape = acts.shape
        self.dtype = acts.dtype
        batch, tokens, n_units = acts.shape
        self.token = nonzeros // n_units                         # [nnz] index into [batch x tokens]
        self.units = nonzeros - self.token * n_units
        self.pair = torch.div(self.token, tokens, rounding_mode="floor") * n_units + self.units  # row x units + unit
        self.position = self.token % tokens
        self.values = acts.reshape(-1)[nonzeros]
        self.table = table

    def __call__(self, rows: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Pairs must be distinct."""
        out = torch.zeros((rows.numel(), self.shape[1]), dtype=self.dtype, device=rows.device)
        if rows.numel() == 0:
            return out
        asked = rows * self.shape[2] + units
        self.table[asked] = torch.arange(rows.numel(), dtype=torch.int32, device=rows.device)
        row = self.table[self.pair]
        hit = row >= 0
        out[row[hit].long(), self.position[hit]] = self.values[hit]
        self.table[asked] = -1
        return out
