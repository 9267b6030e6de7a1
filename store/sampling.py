"""Which contexts a store's quantile and random samples hold: a seeded key per context, shared by the harvest
that draws the samples and the merge that redraws them over shards."""

from __future__ import annotations

import numpy as np


def sampling_keys(context_ids: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random 63-bit key per context (splitmix64 of seed and id). The samples are the contexts with the
    smallest keys, so they do not depend on batch order, shards or restarts: only on the seed and the corpus."""
    with np.errstate(over="ignore"):
        z = (np.asarray(context_ids, np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
             + np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)
