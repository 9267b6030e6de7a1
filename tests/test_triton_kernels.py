"""The TRITON backend's kernels (harvest/triton_kernels.py, driven by harvest/kernels.py), run on the CPU by Triton's
interpreter, against the tensor backend and against brute force.

Triton reads TRITON_INTERPRET as it decorates its own library's functions (when `triton` is first imported, which
torch._dynamo does as soon as anything imports it) and ours: it must be set before anything in the process imports
Triton, and it must not leak into other tests (interpreted kernels would break torch.compile on a GPU). So the
cases run in a child process started with it set (test_the_interpreter_cases), and are skipped elsewhere. Without
Triton, everything here is skipped. The interpreter is slow: small batches, yet the fused pass's tiles are crossed
by a 40-token context (16 tokens a tile) and 150 units (128 a block).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from featureatlas.harvest import kernels
from featureatlas.harvest import run as harvest_run
from featureatlas.harvest.accumulators import Accumulators, Backend, Settings, choose_backend, make_accumulators
from featureatlas.harvest.batchview import BatchView
from featureatlas.harvest.config import HarvestConfig
from featureatlas.harvest.reductions import reduce_eager
from featureatlas.harvest.statistics import N_BINS, Statistics, counted_columns
from featureatlas.harvest.topk import TopK
from featureatlas.store.sampling import sampling_keys

from helpers.batches import UNITS, WIDTH, batches, sparse_batches
from helpers.stores import query
from helpers.tiny_models import HIDDEN, saelens_sae, save_tiny_model, write_corpus

pytest.importorskip("triton", reason="Triton is not installed (pip install -e .[test] on Linux x86-64)")

CHILD = os.environ.get("FEATUREATLAS_TRITON_CASES") == "1"  # set by test_the_interpreter_cases for its child
case = pytest.mark.skipif(not CHILD, reason="run under Triton's interpreter by test_the_interpreter_cases")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WIDE = Settings(top_k=5, bottom_k=5, intervals=6, per_interval=8, random=3, histogram_every=2, seed=7)
NARROW = Settings(top_k=3, bottom_k=2, intervals=4, per_interval=1, random=1, histogram_every=1, seed=7)
STATISTICS = Settings(top_k=1, bottom_k=1, intervals=0, per_interval=0, random=0, histogram_every=1, seed=7)
LISTS_ONLY = Settings(top_k=4, bottom_k=3, intervals=0, per_interval=0, random=0, histogram_every=2, seed=7)


@pytest.mark.slow
def test_the_interpreter_cases() -> None:
    """Every case of this file in a child process whose Triton interprets (see the docstring); all must run."""
    if CHILD:
        pytest.skip("the child process itself")
    env = {**os.environ, "TRITON_INTERPRET": "1", "FEATUREATLAS_TRITON_CASES": "1", "FEATUREATLAS_TRITON": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             __file__, "-k", "not test_the_interpreter_cases"], cwd=Path(__file__).parents[1],
                            env=env, capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    ran = re.search(r"(\d+) passed", summary)
    assert ran and int(ran.group(1)) >= 10 and "skipped" not in summary, summary


@pytest.fixture(scope="module", autouse=True)
def interpreter() -> None:
    """In the child: the kernels run (imported under the interpreter)."""
    if CHILD:
        assert kernels.interpreting() and kernels.available(torch.device("cpu")), "the kernels do not run here"


def accumulators(backend: Backend, dtype: torch.dtype, settings: Settings, units: int = UNITS,
                 width: int = WIDTH, sparse: bool = False) -> Accumulators:
    source = SimpleNamespace(n_units=units, signed=not sparse, sparse=sparse, dictionary=None)
    settings = Settings(**{**vars(settings), "backend": backend})
    return make_accumulators([source], settings, width, torch.device("cpu"), [dtype])[0]  # type: ignore[list-item]


def state(acc: Accumulators) -> dict[str, torch.Tensor]:
    """Every part's results: lists in rank order, samples in key order (free within a bin: the store orders by
    key), the statistics as the store takes them, and the histogram's uncounted row."""
    out: dict[str, torch.Tensor] = {}
    for name in ("top", "bottom"):
        part = getattr(acc, name)
        if part is not None:
            out |= {f"{name}.{key}": getattr(part, key) for key in ("values", "context_ids", "positions")}
            out[f"{name}.activations"] = part.activations()
    for name in ("quantiles", "random"):
        part = getattr(acc, name)
        if part is not None:
            order = part.keys.argsort(dim=2, stable=True)
            out |= {f"{name}.{key}": getattr(part, key).gather(2, order)
                    for key in ("keys", "context_ids", "positions", "values")}
            out[f"{name}.activations"] = part.activations.gather(2, order[..., None].expand_as(part.activations))
            out[f"{name}.exponent"] = part.exponent
    out |= {f"statistics.{key}": value for key, value in acc.statistics.finish().items()}
    out["statistics.uncounted"] = acc.statistics.counts[-1]
    return out


def assert_same_state(got: Accumulators, want: Accumulators, prefix: str = "") -> None:
    """Equal, NaN where NaN; the float64 sums to rounding (each backend adds in its own order)."""
    got_state, want_state = state(got), state(want)
    assert got_state.keys() == want_state.keys()
    for key, value in want_state.items():
        if key.startswith(prefix):
            tolerance = 1e-5 if key.startswith(("statistics.sum_activation", "statistics.sum_squares")) else 0
            torch.testing.assert_close(got_state[key], value, rtol=tolerance, atol=tolerance, equal_nan=True,
                                       msg=key)


def harvest_both(dtype: torch.dtype, settings: Settings, feed: list[tuple[torch.Tensor, BatchView]], units: int = UNITS,
                 width: int = WIDTH) -> tuple[Accumulators, Accumulators]:
    want = accumulators(Backend.TENSOR, dtype, settings, units, width)
    got = accumulators(Backend.TRITON, dtype, settings, units, width)
    assert type(got).__name__ == "TritonLists" and kernels.runs_on(feed[0][0], got.top, got.bottom)
    with torch.inference_mode():
        for acts, view in feed:
            want.update(acts, view)
            got.update(acts, view)
    return got, want


@case
def test_the_kernels_keep_the_tensor_backends_state() -> None:
    """Tied scores everywhere, BOS, padding, a unit that never fires, ranges growing by powers of two. (Strided
    activations reach the kernels only in the fused-pass test: the graphs' buffer makes them dense first. The
    16-bit types, read and copied alike, run with wide lists in the float16 dictionary case, and in the NaN,
    edge-value and fused-pass cases: the interpreter is slow.)"""
    assert_same_state(*harvest_both(torch.float32, WIDE, batches(torch.float32, False)))


@case
def test_narrow_lists_and_every_context_in_the_histogram() -> None:
    assert_same_state(*harvest_both(torch.float32, NARROW, batches(torch.float32, False)))


@case
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_values_count_alike(dtype: torch.dtype) -> None:
    """Zero, subnormal, huge and infinite activations: histograms, extremes, sums and firing counts (their lists
    are left out: an infinite context max has no sample interval; and no samples are kept, to spare the
    interpreter)."""
    assert_same_state(*harvest_both(dtype, STATISTICS, batches(dtype, False, edges=True)), prefix="statistics.")


@case
def test_nan_activations_never_enter_a_list_and_make_the_extremes_nan() -> None:
    """A NaN (in bfloat16) at a counted position makes its context's max and min NaN (torch's amax), so the
    context enters no list or sample (and W does not grow in that batch), and makes its unit's sums NaN; firing
    counts leave it out."""
    dtype = torch.bfloat16
    feed = []
    for i, (acts, view) in enumerate(batches(dtype, False)):
        acts = acts.clone()
        if i in (1, 3):
            acts[1, 4, 5] = float("nan")
            acts[0, 2:4, 6] = float("nan")
        feed.append((acts, view))
    got, want = harvest_both(dtype, NARROW, feed)
    assert_same_state(got, want)
    stats = got.statistics.finish()
    assert stats["max_activation"][5:7].isnan().all() and stats["sum_activation"][5:7].isnan().all()
    assert not stats["max_activation"][7:].isnan().any()
    nan_contexts = {int(feed[1][1].context_ids[1]), int(feed[1][1].context_ids[0])}
    assert not nan_contexts & set(got.top.context_ids[5:7].flatten().tolist())


@case
@pytest.mark.parametrize("dtype, settings", [(torch.bfloat16, NARROW), (torch.float16, WIDE)],
                         ids=["bfloat16-narrow", "float16-wide"])
def test_dictionary_features_keep_the_sparse_tensor_backends_state(dtype: torch.dtype, settings: Settings) -> None:
    """Dictionary features through the kernels from the encode's dense output alone, against the tensor backend
    fed their non-zeros: only contexts that fire enter (a unit whose counted non-zeros are all negative, one
    firing at BOS only, a context with a NaN), and the histogram counts the non-zeros alone."""
    want = accumulators(Backend.TENSOR, dtype, settings, sparse=True)
    got = accumulators(Backend.TRITON, dtype, settings, sparse=True)
    assert type(got).__name__ == "TritonPairs" and not got.wants_nonzeros and want.wants_nonzeros
    with torch.inference_mode():
        for acts, view, nonzeros in sparse_batches(dtype):
            want.update(acts, view, nonzeros)
            got.update(acts, view)
    assert_same_state(got, want)
    assert (got.top.context_ids[1] >= 0).all() and (got.top.context_ids[2:4] == -1).all()
    assert got.statistics.counts[-1].sum() == 0 and got.statistics.counts[:, 0].sum() == 0  # zeros are implied


@case
def test_dictionary_co_occurrence_under_the_kernels_counts_the_non_zeros() -> None:
    """With co-occurrence, the non-zeros are not asked for: the pairs are counted from the dense output (in room
    learned from the batches, each checked at the next), as the tensor backend counts them from the non-zeros."""
    settings = replace(NARROW, cooccurrence=True)
    want = accumulators(Backend.TENSOR, torch.float32, settings, sparse=True)
    got = accumulators(Backend.TRITON, torch.float32, settings, sparse=True)
    assert type(got).__name__ == "TritonPairs" and not got.wants_nonzeros and got.most_nonzeros is None
    with torch.inference_mode():
        for acts, view, nonzeros in sparse_batches(torch.float32):
            want.update(acts, view, nonzeros)
            got.update(acts, view)
    assert_same_state(got, want)
    assert got.cooccurrence is not None and want.cooccurrence is not None and len(want.cooccurrence.pending) > 0
    for name in got.cooccurrence.STATE:
        assert torch.equal(torch.as_tensor(getattr(got.cooccurrence, name)),
                           torch.as_tensor(getattr(want.cooccurrence, name))), name


@case
def test_a_whole_harvest_through_the_kernels_writes_the_native_loops_store(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny llama's top-k SAE through the Harvester, its Reader and the store
    writer with the kernels (the graphs' buffers, run eagerly on the CPU), against the native loops: the same
    lists, samples, statistics and histograms, and co-occurrence counted from the encode's dense output (few
    units and tokens: the interpreter runs a program at a time)."""
    model, corpus = save_tiny_model("llama", tmp_path / "model"), write_corpus(tmp_path / "corpus")
    sae = saelens_sae(tmp_path / "sae", HIDDEN, "blocks.1.hook_resid_post")
    chosen: list[Backend] = []

    def forced(device: torch.device, *options: object) -> Backend:
        chosen.append(Backend.TRITON if triton else choose_backend(device, *options))
        return chosen[-1]

    monkeypatch.setattr(harvest_run, "choose_backend", forced)
    stores = {}
    for triton in (False, True):
        stores[triton] = tmp_path / f"{triton}.duckdb"
        harvest_run.harvest(HarvestConfig(
            model=str(model), corpus=corpus, out=stores[triton], context_length=16, top_k=3, batch_size=4,
            dtype="float32", device="cpu", progress=False, layers="none", saes=[f"res1={sae}"],
            intervals=4, per_interval=2, random_examples=0, seed=7, compile="off", logits=0, tokens=100))
    assert chosen == [Backend.NATIVE, Backend.TRITON]
    queries = ["SELECT source, layer, unit, example_kind, rank, context_id, max_position, max_activation, "
               "interval_lo, activations FROM examples ORDER BY ALL",
               "SELECT * EXCLUDE (mean, std) FROM statistics ORDER BY ALL", "SELECT * FROM histograms ORDER BY ALL",
               "SELECT * FROM neighbours WHERE kind = 'cooccurrence' ORDER BY ALL"]
    native_store, kernels_store = ([query(store, q) for q in queries] for store in stores.values())
    assert len(native_store[0]) > 100 and {row[0] for row in native_store[0]} == {"sae:res1"}
    assert native_store[3], "no co-occurrence was counted"
    assert kernels_store == native_store


def tied_batch(batch: int, tokens: int, units: int, seed: int, first_id: int) -> tuple[torch.Tensor, BatchView]:
    """Values in {-1, 0, 1, 2}: every context's max reached at several positions, in several tiles, and by
    many contexts; BOS and two short contexts (padding)."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.randint(-1, 3, (batch, tokens, units), generator=g).float()
    lengths = torch.full((batch,), tokens)
    lengths[-2:] = torch.tensor([tokens - 9, 3])
    counted = torch.arange(tokens)[None, :] < lengths[:, None]
    counted[:, 0] = False
    ids = torch.arange(first_id, first_id + batch)
    return acts, BatchView(counted, 1, True, ids, torch.from_numpy(sampling_keys(ids.numpy(), 7)),
                           int(counted.sum()))


@case
def test_ties_go_to_the_first_position_and_the_lower_context() -> None:
    """Against the tensor backend and brute force: a unit's list is its contexts by (highest max, lowest id), each
    at the first counted position reaching the max (or the min: bottom lists), across 16-token tiles."""
    feed = [tied_batch(6, 40, 9, seed, 100 * seed) for seed in range(3)]
    got, want = harvest_both(torch.float32, LISTS_ONLY, feed, units=9, width=40)
    assert_same_state(got, want)
    for name, largest in (("top", True), ("bottom", False)):
        part = getattr(got, name)
        for unit in range(9):
            rows = []
            for acts, view in feed:
                for b in range(acts.shape[0]):
                    values = [(float(acts[b, t, unit]), t) for t in range(acts.shape[1]) if view.counted[b, t]]
                    best = max(v for v, _ in values) if largest else min(v for v, _ in values)
                    first = next(t for v, t in values if v == best)
                    rows.append((-best if largest else best, int(view.context_ids[b]), first))
            expected = sorted(rows)[:part.k]
            assert part.context_ids[unit].tolist() == [c for _, c, _ in expected], (name, unit)
            assert part.positions[unit].tolist() == [p for _, _, p in expected], (name, unit)


@case
def test_samples_follow_a_range_growing_one_doubling_at_a_time() -> None:
    """The samples' W doubles once, twice, then many times between batches (re-binning kept entries in place,
    each bin keeping the smallest keys of the bins it merges), against the tensor backend; ties across bins.
    (One entry a bin: the narrow-lists case.)"""
    per = 3
    feed = []
    for i, scale in enumerate([1.0, 2.0, 4.5, 9.5, 40.0, 41.0, 2000.0]):
        acts, view = tied_batch(5, 12, 9, seed=i, first_id=20 * i)
        acts = (acts + torch.rand(acts.shape, generator=torch.Generator().manual_seed(i)).round(decimals=1)) * scale
        feed.append((acts, view))
    settings = Settings(top_k=2, bottom_k=1, intervals=8, per_interval=per, random=per, histogram_every=3, seed=7)
    assert_same_state(*harvest_both(torch.float32, settings, feed, units=9, width=12))


@case
@pytest.mark.parametrize("dtype, strided", [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
                                            (torch.bfloat16, True)], ids=["float32", "bfloat16", "float16",
                                                                          "bfloat16-strided"])
def test_the_fused_pass_against_brute_force(dtype: torch.dtype, strided: bool) -> None:
    """One read: extremes and their first positions, sums, firing counts and the sampled contexts' histogram
    equal brute force and the tensor code; the candidates are exactly the contexts beating each unit's k-th
    kept score (read on the device), for both lists. Strided: units not innermost, as a hook may give them."""
    g = torch.Generator().manual_seed(3)
    batch, tokens, units = 5, 40, 150
    acts = (torch.randn(batch, tokens, units, generator=g) * 4).round().to(dtype)  # ties across tiles
    if strided:
        acts = acts.transpose(1, 2).contiguous().transpose(1, 2)
    counted = torch.ones(batch, tokens, dtype=torch.bool)
    counted[:, 0] = False
    counted[3, 30:] = False
    ids = torch.arange(10, 10 + batch)
    keys = torch.tensor([4, 7, 9, 12, 2])  # histogram_every 2: contexts 0, 3 and 4
    view = BatchView(counted, 1, True, ids, keys, int(counted.sum()))
    statistics = Statistics(units, torch.device("cpu"), sparse=False, histogram_every=2)
    top, bottom = (TopK(units, 3, tokens, torch.device("cpu"), dtype) for _ in range(2))
    top.values[:, -1] = torch.randn(units, generator=g) * 4  # each unit's k-th score
    bottom.values[:, -1] = torch.randn(units, generator=g) * 4
    top_scratch, bottom_scratch = kernels.Candidates(), kernels.Candidates()
    passed = kernels.fused_pass(acts, view, statistics, top, top_scratch, bottom, bottom_scratch)

    high, low, total, squares, firing = reduce_eager(acts, counted, 1, True)
    assert torch.equal(passed.context_max, high.float()) and torch.equal(passed.context_min, low.float())
    x = acts.float()
    for extreme, at, sign in ((passed.context_max, passed.max_at, 1), (passed.context_min, passed.min_at, -1)):
        reaches = counted[..., None] & (x == extreme[:, None, :])
        first = torch.where(reaches, torch.arange(tokens)[None, :, None], tokens).amin(dim=1)
        assert torch.equal(at.long(), first), sign
    exact = torch.where(counted[..., None], x.double(), 0).sum(dim=(0, 1))
    torch.testing.assert_close(passed.sums[0], exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(passed.sums[1], (torch.where(counted[..., None], x.double(), 0) ** 2).sum(dim=(0, 1)))
    assert torch.equal(passed.sums[2], firing) and torch.equal(firing, ((x > 0) & counted[..., None]).sum((0, 1)))
    want = torch.zeros(N_BINS + 1, units, dtype=torch.int64)
    rows = torch.tensor([0, 3, 4])
    found = counted_columns(acts[rows], counted[rows])
    want.scatter_add_(0, found, torch.ones_like(found))
    assert torch.equal(statistics.counts, want)

    for part, scratch, scores in ((top, top_scratch, high.float()), (bottom, bottom_scratch, -low.float())):
        count, listed = scratch.of(units, batch, torch.device("cpu"))
        enters = scores > part.values[:, -1]
        assert torch.equal(count.long(), enters.sum(dim=0))
        for unit in range(units):
            assert sorted(listed[unit, :count[unit]].tolist()) == enters[:, unit].nonzero().squeeze(1).tolist()


@case
def test_the_self_check_a_gpu_gets_before_the_kernels_are_chosen_passes() -> None:
    assert kernels.self_check(torch.device("cpu")) is None


@case
def test_where_the_kernels_do_not_run_the_backend_takes_the_tensor_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """FEATUREATLAS_TRITON=0 (as without Triton): the fixed-shape tensor step, the same state; and the backend is
    never chosen for a CPU, nor for CUDA where no GPU is there."""
    monkeypatch.setenv("FEATUREATLAS_TRITON", "0")
    feed = batches(torch.float32, False)
    assert not kernels.runs_on(feed[0][0])
    want, got = accumulators(Backend.TENSOR, torch.float32, NARROW), accumulators(Backend.TRITON, torch.float32, NARROW)
    with torch.inference_mode():
        for acts, view in feed:
            want.update(acts, view)
            got.update(acts, view)
    assert_same_state(got, want)
    monkeypatch.delenv("FEATUREATLAS_TRITON")
    assert choose_backend(torch.device("cpu")) is not Backend.TRITON
    if not torch.cuda.is_available():
        assert choose_backend(torch.device("cuda")) is Backend.GRAPHS
