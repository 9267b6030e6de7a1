"""Brute-force references that tests check the harvest's own computations against."""

from __future__ import annotations

import numpy as np


def nearest_by_jaccard(firing: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """firing [tokens, n] bool -> each feature's k nearest by Jaccard (ties: lower feature first)."""
    f = firing.astype(np.int64)
    both = f.T @ f
    either = f.sum(0)[:, None] + f.sum(0)[None, :] - both
    n = firing.shape[1]
    index, score = np.full((n, k), -1), np.zeros((n, k))
    for a in range(n):
        partners = [(-(both[a, b] / either[a, b]), b) for b in range(n) if b != a and both[a, b] > 0]
        for r, (s, b) in enumerate(sorted(partners)[:k]):
            index[a, r], score[a, r] = b, -s
    return index, score
