"""Co-occurrence of features, exact against a brute-force count over a dense firing matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featureatlas.harvest.cooccurrence import CoOccurrence

from helpers.reference import nearest_by_jaccard


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
    want_index, want_score = nearest_by_jaccard(firing, k)
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


def random_batches(n: int, seed: int, count: int = 6, positions: int = 30) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        acts = (rng.random((positions, n)) < 0.15) * rng.random((positions, n))
        out.append((torch.from_numpy(np.flatnonzero(acts)), torch.from_numpy(rng.random(positions) < 0.8)))
    return out


def test_past_the_budget_the_most_frequent_pairs_stay_ties_to_the_lower_key() -> None:
    n, budget = 30, 40
    acc = CoOccurrence(n, max_pairs=budget, flush=10**9)  # one merge, at the end: the cut is over every count
    whole = CoOccurrence(n, flush=10**9)
    for nonzeros, counted in random_batches(n, seed=1):
        acc.update(nonzeros, counted)
        whole.update(nonzeros, counted)
    acc.nearest()
    whole.nearest()
    keys, counts = whole.keys.tolist(), whole.counts.tolist()
    assert len(keys) > budget and whole.complete and not acc.complete
    want = sorted(sorted(range(len(keys)), key=lambda i: (-counts[i], keys[i]))[:budget])
    assert acc.keys.tolist() == [keys[i] for i in want] and acc.counts.tolist() == [counts[i] for i in want]


@pytest.mark.parametrize("budget", [None, 25])  # every pair kept, and the rarest dropped along the way
def test_state_saved_mid_run_and_restored_continues_as_if_never_stopped(budget: int | None) -> None:
    n, batches = 30, random_batches(30, seed=2, count=8)
    whole = CoOccurrence(n, max_pairs=budget, flush=300)
    for nonzeros, counted in batches:
        whole.update(nonzeros, counted)
    first = CoOccurrence(n, max_pairs=budget, flush=300)
    for nonzeros, counted in batches[:5]:
        first.update(nonzeros, counted)
    saved = {name: getattr(first, name) for name in CoOccurrence.STATE}
    assert len(saved["keys"]) > 0 and len(saved["pending"]) > 0  # merged, and buffered: both are state
    resumed = CoOccurrence(n, max_pairs=budget, flush=300)
    for name, value in saved.items():
        setattr(resumed, name, value.clone() if isinstance(value, torch.Tensor) else value)
    resumed.check_state()
    for nonzeros, counted in batches[5:]:
        resumed.update(nonzeros, counted)
    assert resumed.complete == whole.complete == (budget is None)
    for got, want in zip(resumed.nearest(), whole.nearest(), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("tamper, message", [
    (lambda a: setattr(a, "keys", a.keys.flip(0)), "not sorted"),
    (lambda a: (setattr(a, "keys", torch.tensor([2 * 31 + 1])), setattr(a, "counts", torch.tensor([1]))),
     "pairs i < j"),  # (2, 1): j < i
    (lambda a: setattr(a, "counts", a.counts + 10**6), "exceed"),
    (lambda a: setattr(a, "counts", a.counts[:-1]), "wrong shape"),
    (lambda a: setattr(a, "pending", torch.tensor([-5])), "pairs i < j"),
])
def test_restored_state_that_could_not_have_been_counted_is_refused(tamper, message: str) -> None:
    acc = CoOccurrence(31, flush=10**9)
    for nonzeros, counted in random_batches(31, seed=3):
        acc.update(nonzeros, counted)
    acc.nearest()
    acc.check_state()
    tamper(acc)
    with pytest.raises(ValueError, match=message):
        acc.check_state()


def dense_batch(rng: np.random.Generator, n: int, most: int, nan: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[4, 9, n] activations with up to `most` non-zeros a token (some none, negative ones), and counted tokens."""
    acts = torch.zeros(4, 9, n)
    for b in range(4):
        for t in range(9):
            chosen = rng.choice(n, size=rng.integers(0, most + 1), replace=False)
            acts[b, t, chosen] = torch.from_numpy(rng.normal(size=len(chosen))).float()
    if nan:
        acts[1, 2, 3] = float("nan")
    return acts, torch.from_numpy(rng.random((4, 9)) < 0.8)


@pytest.mark.parametrize("flush", [10**9, 40])  # one merge at the end; a buffer merged and tokens sliced
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("top_k", [True, False], ids=["top-k", "any encode"])
def test_a_dense_encode_output_counts_as_its_non_zeros(flush: int, dtype: torch.dtype, top_k: bool) -> None:
    """update_dense from [batch, tokens, n] activations (some tokens firing none, negative ones, a NaN, uncounted
    tokens) keeps what update keeps from their non-zeros: told that the encode keeps at most k a token, or not
    (the room learned, and later batches firing more than it holds); its saved state restores as update's does."""
    rng = np.random.default_rng(4)
    n, k = 30, 6
    dense, sparse = CoOccurrence(n, flush=flush), CoOccurrence(n, flush=flush)
    for i in range(7):
        acts, counted = dense_batch(rng, n, k if top_k or i < 3 else 3 * k, nan=i == 2)
        acts = acts.to(dtype)
        dense.update_dense(acts, counted, k if top_k else None)
        sparse.update(acts.reshape(-1).nonzero().squeeze(1), counted)
        if i == 3:  # mid-run: the state (the device buffer drained into it) restores into a fresh one
            saved = {name: getattr(dense, name) for name in CoOccurrence.STATE}
            dense = CoOccurrence(n, flush=flush)  # as a resumed run's: no room yet
            for name, value in saved.items():
                setattr(dense, name, value.clone() if isinstance(value, torch.Tensor) else value)
            dense.check_state()
    dense_nearest, sparse_nearest = dense.nearest(5), sparse.nearest(5)
    assert torch.equal(dense.firing, sparse.firing) and int(dense.firing.sum()) > 0
    assert torch.equal(dense.keys, sparse.keys) and torch.equal(dense.counts, sparse.counts) and len(dense.keys)
    for got, want in zip(dense_nearest, sparse_nearest, strict=True):
        assert torch.equal(got, want)


def test_a_batch_that_does_not_fit_its_room_is_counted_again_and_the_room_grows() -> None:
    """Without a bound from the encode, each batch is checked at the next call: one firing more entries or pairs
    than the room held (the first, and one firing three times as many) is counted again through update, the room
    grown to hold it; batches that fit are not, and the state read is update's, in update's order."""
    rng = np.random.default_rng(5)
    n = 40
    dense, sparse = CoOccurrence(n, flush=10**9), CoOccurrence(n, flush=10**9)
    again = []
    count = dense.update
    dense.update = lambda *args: (again.append(len(history)), count(*args))  # type: ignore[method-assign]
    history: list[bool] = []
    short: list[int] = []  # the entries of the batches that fell short
    for most in (4, 4, 4, 12, 12, 4, 12):
        acts, counted = dense_batch(rng, n, most)
        fires = (acts != 0) & counted[..., None]
        per_token = fires.reshape(-1, n).sum(1)
        entries, pairs = int(per_token.sum()), int((per_token * (per_token - 1) // 2).sum())
        dense.update_dense(acts, counted)  # checks the batch before, then counts this one in the room it has
        history.append(entries > dense._room[0] or pairs > dense._room[1])
        short += [entries] if history[-1] else []
        sparse.update(acts.reshape(-1).nonzero().squeeze(1), counted)
    assert torch.equal(dense.pending, sparse.pending)  # in order: read, the last batch is checked first
    assert torch.equal(dense.firing, sparse.firing)
    assert history[0] and history[3] and not history[1] and not history[5]
    assert again == [i + 1 for i, fell_short in enumerate(history) if fell_short]
    assert dense._room[0] >= 1.25 * max(short)  # grown a quarter above the largest that fell short


def test_an_encode_firing_more_than_its_bound_is_still_counted_exactly() -> None:
    """A dictionary said to keep at most k features a token that keeps more (a malformed or mislabelled one) is
    counted again from its non-zeros, never silently short."""
    rng = np.random.default_rng(6)
    dense, sparse = CoOccurrence(30), CoOccurrence(30)
    for _ in range(3):
        acts, counted = dense_batch(rng, 30, 9)
        dense.update_dense(acts, counted, 3)
        sparse.update(acts.reshape(-1).nonzero().squeeze(1), counted)
    assert torch.equal(dense.pending, sparse.pending) and torch.equal(dense.firing, sparse.firing)
