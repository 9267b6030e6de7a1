"""Co-occurrence of features, exact against a brute-force count over a dense firing matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featureatlas.harvest.cooccurrence import CoOccurrence


def brute_force(firing: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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


@pytest.mark.parametrize("flush", [10**9, 50])  # merged once at the end, and many times along the way
def test_counts_and_nearest_are_exact(flush: int) -> None:
    rng = np.random.default_rng(0)
    n, k = 40, 5
    acc = CoOccurrence(n, flush=flush)
    seen = []
    for _ in range(6):  # batches of [positions, n] activations, some positions not counted (BOS, padding)
        acts = (rng.random((30, n)) < 0.12) * rng.random((30, n))
        counted = rng.random(30) < 0.8
        nonzeros = torch.from_numpy(np.flatnonzero(acts))
        acc.update(nonzeros[torch.randperm(len(nonzeros))], torch.from_numpy(counted))  # in any order
        seen.append((acts > 0) & counted[:, None])
    firing = np.concatenate(seen)
    index, score = acc.nearest(k)
    want_index, want_score = brute_force(firing, k)
    assert acc.complete and acc.firing.tolist() == firing.sum(0).tolist()
    assert index.tolist() == want_index.tolist()
    np.testing.assert_allclose(score.numpy(), want_score, rtol=1e-6)


def test_memory_is_bounded_and_says_so() -> None:
    acc = CoOccurrence(20, max_pairs=10, flush=1)
    acc.update(torch.arange(20), torch.tensor([True]))  # one token, every feature: 190 pairs
    acc.update(torch.tensor([0, 1]), torch.tensor([True]))  # the pair (0, 1) twice
    index, _ = acc.nearest(3)
    assert len(acc.keys) <= 10 and not acc.complete
    assert index[0, 0].item() == 1  # the most frequent pair survives the cut
