"""A map of a source's units: a point in 2-D per unit, placed so that units whose directions have a high cosine
lie close together. The method is UMAP (McInnes, Healy & Melville, 2018), the field's usual choice for feature
maps, written here in numpy instead of taken from umap-learn, which brings numba and llvmlite and compiles its
kernels on first use: no new dependency, and 16,384 SAE features map in some 15 CPU-seconds.

UMAP's steps, with its defaults (15 neighbours, min_dist 0.1, 5 negative samples per edge):
1. the exact k nearest units by cosine (neighbours.nearest); distance is 1 - cosine;
2. the fuzzy graph: each unit's distances, less its nearest one, scaled so that its memberships sum to log2(k),
   then symmetrised by probabilistic union (a + b - ab); edges too weak to be sampled in the run dropped;
3. a spectral start: the graph's two leading non-trivial eigenvectors (here approximated by subspace iteration);
4. epochs of stochastic gradient descent on UMAP's cross-entropy: each edge, sampled in proportion to its weight,
   pulls its two ends together along the curve 1 / (1 + a d^2b); random units push its head away.
One liberty: numpy has no fast loop over single edges, so an epoch's edges move their points in batches of about
one edge per point, each batch's moves computed from the positions at its start, and a point's summed move in a
batch bounded as one of UMAP's steps is. Seeded: the same vectors and seed give the same map.
Units without a direction (zero or non-finite vectors) get no edges: they sit in a grid below the map.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from featureatlas.harvest.neighbours import directions, nearest
from featureatlas.harvest.sources import UnitSource

N_NEIGHBOURS = 15
NEGATIVES = 5
# UMAP's output curve 1 / (1 + a d^(2b)) for min_dist 0.1, spread 1.0 (umap-learn's find_ab_params).
A, B = 1.5769434603113077, 0.8950608781227859
CLIP = 4.0  # UMAP's bound on each gradient component
BATCH = 1.0  # edges a batch, per point: few points get more than a move or two from one batch
MIN_BATCH = 4096  # edges: small maps are not cut into batches of a few edges each
SPECTRAL_ITERATIONS = 100  # subspace iterations for the spectral start: a smooth start, not exact eigenvectors
KINDS = ("decoder", "output")  # which directions a source is mapped by, first found wins


def epochs_for(n: int) -> int:
    """UMAP's default: 500 epochs for up to 10,000 points, 200 above."""
    return 500 if n <= 10_000 else 200


def layout(vectors: torch.Tensor | np.ndarray, seed: int = 0, n_neighbours: int = N_NEIGHBOURS,
           epochs: int | None = None, knn: tuple[torch.Tensor, torch.Tensor] | None = None) -> np.ndarray:
    """[n, 2] float32 map coordinates of the n rows of vectors. knn: (index, score) of each row's nearest rows by
    cosine, as neighbours.nearest returns them (pass the harvest's own to save computing them again; columns past
    n_neighbours are ignored)."""
    v = torch.as_tensor(vectors).detach()
    if v.ndim != 2:
        raise ValueError(f"layout: vectors must be [units, width], got shape {tuple(v.shape)}")
    n = v.shape[0]
    out = np.zeros((n, 2), np.float32)
    has_direction = (torch.isfinite(v).all(dim=1) & (v.abs().sum(dim=1) > 0)).cpu().numpy()
    kept = np.nonzero(has_direction)[0]
    m = len(kept)
    if m >= 2:
        k = min(n_neighbours, m - 1)
        if knn is not None and m == n and knn[0].shape[1] >= k:
            index, score = knn[0][:, :k], knn[1][:, :k]
        else:
            index, score = nearest(v[torch.from_numpy(kept).to(v.device)], k=k)
        distance = np.clip(1.0 - score.double().cpu().numpy(), 0.0, 2.0)
        head, tail, weight = fuzzy_graph(index.cpu().numpy().astype(np.int64), distance)
        epochs = epochs or epochs_for(m)
        strong = weight >= weight.max() / epochs  # UMAP drops edges too weak to be sampled in the run
        head, tail, weight = head[strong], tail[strong], weight[strong]
        rng = np.random.default_rng(seed)
        y = spectral_start(m, head, tail, weight, rng)
        y = optimise(y, head, tail, weight, epochs, rng)
        out[kept] = (y - y.mean(axis=0)).astype(np.float32)
    _set_aside(out, ~has_direction, has_direction)
    return out


def source_layout(model: torch.nn.Module, source: UnitSource, seed: int = 0) -> tuple[str, np.ndarray] | None:
    """(kind, [units, 2]) for a source with directions to map (dictionary features by decoder row, neurons by
    their row of the MLP output projection), else None (residual dimensions are orthogonal; heads have none)."""
    found = directions(model, source)
    for kind in KINDS:
        if kind in found:
            return kind, layout(found[kind], seed)
    return None


def fuzzy_graph(index: np.ndarray, distance: np.ndarray, iterations: int = 64
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UMAP's fuzzy simplicial set from each point's k nearest (index, distance [n, k], nearest first): directed
    edges (head, tail, weight), each undirected edge listed both ways, as UMAP's optimiser takes them."""
    n, k = index.shape
    positive = np.where(distance > 0, distance, np.inf)
    rho = positive.min(axis=1)
    rho[~np.isfinite(rho)] = 0.0  # every neighbour at distance 0: duplicates
    excess = np.maximum(distance - rho[:, None], 0.0)
    target = math.log2(k) if k > 1 else 1.0
    lo, hi = np.zeros(n), np.full(n, np.inf)
    sigma = np.ones(n)
    for _ in range(iterations):  # bisection per point, all points at once
        total = np.exp(-excess / sigma[:, None]).sum(axis=1)
        over = total > target
        hi = np.where(over, sigma, hi)
        lo = np.where(over, lo, sigma)
        sigma = np.where(np.isinf(hi), sigma * 2, (lo + hi) / 2)
    mean_distance = distance.mean()
    sigma = np.maximum(sigma, 1e-3 * np.where(rho > 0, distance.mean(axis=1), mean_distance))
    member = np.exp(-excess / sigma[:, None])

    rows = np.repeat(np.arange(n), k)
    cols = index.reshape(-1)
    w = member.reshape(-1)
    # Union: 1 - (1 - w_ij)(1 - w_ji), over the unordered pair's one or two directed memberships.
    pair = np.minimum(rows, cols) * n + np.maximum(rows, cols)
    keys, inverse = np.unique(pair, return_inverse=True)
    with np.errstate(divide="ignore"):
        log_miss = np.bincount(inverse, np.log1p(-np.minimum(w, 1.0)), len(keys))
    union = -np.expm1(log_miss)
    a, b = keys // n, keys % n
    keep = a != b
    a, b, union = a[keep], b[keep], union[keep]
    return np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([union, union])


def spectral_start(n: int, head: np.ndarray, tail: np.ndarray, weight: np.ndarray, rng: np.random.Generator,
                   iterations: int = SPECTRAL_ITERATIONS) -> np.ndarray:
    """[n, 2] in [0, 10]: the graph's two leading non-trivial eigenvectors of its normalised adjacency (those of
    the normalised Laplacian UMAP starts from), by subspace iteration on (I + adjacency) / 2 with the trivial one,
    sqrt(degree), projected out; random where they cannot be found (a graph of two points)."""
    degree = np.bincount(head, weight, n)
    values = weight / np.sqrt(degree[head] * degree[tail])
    trivial = np.sqrt(degree / degree.sum())
    u, v = rng.standard_normal(n), rng.standard_normal(n)  # two columns, kept apart: numpy is faster in 1-D
    for _ in range(iterations):
        u = 0.5 * (u + np.bincount(head, values * u[tail], n))
        v = 0.5 * (v + np.bincount(head, values * v[tail], n))
        u -= trivial * (trivial @ u)
        v -= trivial * (trivial @ v)
        u /= max(float(np.linalg.norm(u)), 1e-300)  # Gram-Schmidt
        v -= u * (u @ v)
        v /= max(float(np.linalg.norm(v)), 1e-300)
    start = np.stack([u, v], axis=1)
    if n < 3 or not np.isfinite(start).all() or np.ptp(start, axis=0).min() <= 1e-9:
        start = rng.uniform(size=(n, 2))
    start = start + rng.normal(0, 1e-4 * np.abs(start).max(), start.shape)
    low, span = start.min(axis=0), np.ptp(start, axis=0)
    return 10.0 * (start - low) / np.where(span > 0, span, 1.0)


def optimise(y: np.ndarray, head: np.ndarray, tail: np.ndarray, weight: np.ndarray, epochs: int,
             rng: np.random.Generator) -> np.ndarray:
    """UMAP's layout optimisation of y [n, 2] (returned): per epoch the edges due by their sampling rate pull
    their ends together and NEGATIVES random points push each edge's head away; the step falls linearly to 0."""
    n = len(y)
    if len(head) == 0:
        return y
    xs, ys = y[:, 0].copy(), y[:, 1].copy()
    per_sample = weight.max() / weight  # epochs between samples of an edge
    next_due = per_sample.copy()
    a, b = np.float32(A), np.float32(B)
    for epoch in range(epochs):
        alpha = 1.0 - epoch / epochs
        due = np.nonzero(next_due <= epoch + 1)[0]
        next_due[due] += per_sample[due]
        order = rng.permutation(due)
        bound = np.float32(CLIP * alpha)
        for batch in np.array_split(order, max(1, math.ceil(len(order) / max(n * BATCH, MIN_BATCH)))):
            x32, y32 = xs.astype(np.float32), ys.astype(np.float32)
            h, t = head[batch], tail[batch]
            dx, dy = x32[h] - x32[t], y32[h] - y32[t]
            d2 = np.maximum(dx * dx + dy * dy, np.float32(1e-12))  # coincident ends: dx = dy = 0, no pull
            p = np.exp(b * np.log(d2))
            pull = np.float32(-2 * A * B * alpha) * p / (d2 * (1 + a * p))
            pull_x, pull_y = np.clip(pull * dx, -bound, bound), np.clip(pull * dy, -bound, bound)
            hn = np.repeat(h, NEGATIVES)
            other = ((rng.bit_generator.random_raw(len(hn)) >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32)
            dx, dy = x32[hn] - x32[other], y32[hn] - y32[other]  # a point drawn as its own negative: 0, no push
            d2 = dx * dx + dy * dy
            push = np.float32(2 * B * alpha) / ((np.float32(0.001) + d2) * (1 + a * np.exp(b * np.log(
                np.maximum(d2, np.float32(1e-30))))))
            push_x, push_y = np.clip(push * dx, -bound, bound), np.clip(push * dy, -bound, bound)
            # A point's moves in a batch add up; bounded as one of UMAP's steps is, so that a hub (in the lists of
            # many points) is not flung out by the sum of its many repulsions.
            xs += np.clip(np.bincount(h, pull_x, n) - np.bincount(t, pull_x, n) + np.bincount(hn, push_x, n),
                          -bound, bound)
            ys += np.clip(np.bincount(h, pull_y, n) - np.bincount(t, pull_y, n) + np.bincount(hn, push_y, n),
                          -bound, bound)
    return np.stack([xs, ys], axis=1)


def _set_aside(out: np.ndarray, aside: np.ndarray, placed: np.ndarray) -> None:
    """Units without a direction in a grid just below the placed ones, spaced about as those are (or alone, when
    none was placed)."""
    count = int(aside.sum())
    if count == 0:
        return
    if placed.any():
        low, high = out[placed].min(axis=0), out[placed].max(axis=0)
    else:
        low, high = np.zeros(2, np.float32), np.ones(2, np.float32)
    extent = max(float((high - low).max()), 1e-3)
    columns = max(1, min(count, math.ceil(math.sqrt(count * 8))))
    spacing = min(extent / columns, extent / math.sqrt(max(int(placed.sum()), 1)))
    i = np.arange(count)
    out[aside, 0] = low[0] + (i % columns + 0.5) * spacing
    out[aside, 1] = low[1] - 0.05 * extent - spacing * (i // columns)
