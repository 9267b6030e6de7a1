"""The native list merges (harvest/native.py) keep exactly the lists that the tensor code they replace keeps.

The brute-force tests (test_features.py, test_harvest.py) check the harvest's lists against their definitions with
the native loop on (the default on CPU) and off; these feed both paths the same awkward batches directly: many
tied scores, padding, BOS, a unit's range growing by several powers of two at once, strided activations and
every dtype the loop reads.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from featureatlas.harvest import native, reductions
from featureatlas.harvest.activation_rows import DenseRows
from featureatlas.harvest.batchview import BatchView
from featureatlas.harvest.harvester import Accumulators, Settings
from featureatlas.harvest.reductions import reduce_eager
from featureatlas.harvest.reservoir import Reservoir
from featureatlas.harvest.statistics import Statistics
from featureatlas.harvest.topk import TopK
from featureatlas.store.sampling import sampling_keys

# Skipped only where there is no compiler: where there is one, a native.cpp that does not build fails them.
pytestmark = pytest.mark.skipif(native.find_compiler() is None, reason="no C++ compiler to build harvest/native.cpp")


def test_native_cpp_builds_where_there_is_a_compiler() -> None:
    assert native.library() is not None, "harvest/native.cpp did not build: see the line above on stderr"

# 11 counted rows of 12 (BOS) in a full context: native.reduce takes 8 at once, then 1 by 1. Lists wider than the
# batches' tokens: the rest is zero padding.
UNITS, TOKENS, WIDTH = 13, 12, 14
SCALES = [1.0, 0.25, 9.0, 300.0, 0.5, 2.0]  # batch 3 raises the units' ranges by up to five doublings at once


def batches(dtype: torch.dtype, strided: bool) -> list[tuple[torch.Tensor, BatchView]]:
    generator = torch.Generator().manual_seed(0)
    out, next_id = [], 0
    for i, scale in enumerate(SCALES):
        size = 4 + i % 3
        shape = (size, TOKENS, UNITS)
        levels = torch.randint(-4, 5, shape, generator=generator).float() / 2  # ties everywhere
        spread = torch.randn(shape, generator=generator) * 2  # and values anywhere within the bins
        values = torch.where(torch.rand(shape, generator=generator) < 0.5, levels, spread)
        values[:, :, 0] = 0  # a unit that never fires
        acts = (values * scale).to(dtype)
        if strided:
            acts = acts.transpose(1, 2).contiguous().transpose(1, 2)  # [batch, tokens, units], units not innermost
        lengths = torch.full((size,), TOKENS)
        if i % 2:
            lengths[-2:] = torch.tensor([TOKENS - 3, 2])
        counted = torch.arange(TOKENS)[None, :] < lengths[:, None]
        counted[:, 0] = False  # BOS
        ids = torch.arange(next_id, next_id + size)
        next_id += size
        view = BatchView(counted, 1, bool(i % 2), ids, torch.from_numpy(sampling_keys(ids.numpy(), 7)),
                         int(counted.sum()))
        out.append((acts, view))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_native_lists_equal_the_tensor_code(dtype: torch.dtype, strided: bool) -> None:
    def lists(loop: bool) -> list:
        cpu = torch.device("cpu")
        top, bottom = (TopK(UNITS, 5, WIDTH, cpu, dtype, native=loop) for _ in range(2))
        samples = [Reservoir(UNITS, bins, per, WIDTH, cpu, dtype, native=loop)  # bins that keep all, or one
                   for bins, per in ((6, 8), (4, 1), (1, 3))]
        for acts, view in batches(dtype, strided):
            assert native.reads(acts, top.slot_activations)
            high, low, *_ = reduce_eager(acts, view.counted, view.first_counted, view.padded)
            top.update(DenseRows(acts), view, high)
            bottom.update(DenseRows(acts), view, -low, largest=False)
            for reservoir in samples:
                reservoir.update(DenseRows(acts), view, high)
        return [_ranked(top), _ranked(bottom), *(_by_key(r) for r in samples)]

    native_lists, tensor_lists = lists(True), lists(False)
    for got, want in zip(native_lists, tensor_lists, strict=True):
        for name in want:
            assert torch.equal(got[name], want[name]), name


def test_the_lists_are_full_and_the_ranges_grew() -> None:
    """The comparison above is not vacuous: lists filled, ties met, samples re-binned."""
    top = TopK(UNITS, 5, WIDTH, torch.device("cpu"), torch.float32, native=True)
    reservoir = Reservoir(UNITS, 6, 2, WIDTH, torch.device("cpu"), torch.float32, native=True)
    for acts, view in batches(torch.float32, False):
        high, *_ = reduce_eager(acts, view.counted, view.first_counted, view.padded)
        top.update(DenseRows(acts), view, high)
        reservoir.update(DenseRows(acts), view, high)
    assert (top.context_ids[1:] >= 0).all() and (top.values[:, :-1] == top.values[:, 1:]).any()
    assert (reservoir.exponent[1:] >= 8).all() and (reservoir.context_ids[1:] >= 0).sum() > 2 * UNITS
    assert (reservoir.context_ids[0] == -1).all()  # the unit that never fires keeps nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("every", [1, 2])
def test_native_histogram_equals_the_tensor_code(dtype: torch.dtype, every: int) -> None:
    """Every bin edge case too: zero, below 2^-16, at and beyond 2^16, infinities, both signs."""
    def counts(loop: bool) -> torch.Tensor:
        statistics = Statistics(UNITS, torch.device("cpu"), False, every, native=loop)
        for i, (acts, view) in enumerate(batches(dtype, dtype != torch.float32)):
            if i == 2:
                acts = acts.clone()
                acts[:, 3, 1:9] = torch.tensor([1e-7, -1e-7, 2.0**16, -(2.0**16), 6e4, -6e4, float("inf"),
                                                float("-inf")]).to(dtype)
            high, low, *sums = reduce_eager(acts, view.counted, view.first_counted, view.padded)
            statistics.update(acts, view, high, low, sums)
        return statistics.counts

    native_counts, tensor_counts = counts(True), counts(False)
    assert native_counts.sum() > 0 and torch.equal(native_counts, tensor_counts)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order", ["ascending", "top-k"])
def test_native_sparse_lists_equal_the_tensor_code(dtype: torch.dtype, order: str) -> None:
    """Dictionary features: rows rebuilt from the non-zeros, listed ascending (torch's nonzero) or position by
    position in any order (a top-k encode's); contexts whose only counted non-zeros are negative, or whose
    non-zeros are all uncounted (BOS, padding), never fire."""
    def state(loop: bool) -> list:
        source = SimpleNamespace(n_units=UNITS, signed=False, sparse=True)
        settings = Settings(top_k=5, intervals=6, per_interval=8, random=3, native=loop)
        acc = Accumulators(source, settings, WIDTH, torch.device("cpu"), dtype)  # type: ignore[arg-type]
        assert acc.native_pairs == loop
        generator = torch.Generator().manual_seed(1)
        for acts, view in batches(dtype, False):
            acts = torch.where(torch.rand(acts.shape, generator=generator) < 0.6, 0, acts.float().abs()).to(dtype)
            acts[:, 1:, 2] = -acts[:, 1:, 2]  # unit 2: negative non-zeros only, except at BOS
            acts[:, 1:, 3], acts[:, 0, 3] = 0, 7  # unit 3 at BOS only: never counted
            acts[0, 2, 4] = float("nan")  # a context with a NaN never fires
            nonzeros = acts.reshape(-1).nonzero().squeeze(1)
            if order == "top-k":  # each position's entries in a scrambled order, positions still ascending
                position = nonzeros // UNITS
                scramble = torch.rand(nonzeros.shape, generator=generator)
                nonzeros = nonzeros[torch.argsort(position.double() + scramble * 0.5)]
            acc.update(acts, view, nonzeros)
        lists = [_ranked(acc.top), _by_key(acc.quantiles), _by_key(acc.random)]
        stats = {name: getattr(acc.statistics, name) for name in ("n_firing", "sum", "sum_squares", "min", "max",
                                                                    "counts")}
        return [*lists, stats]

    native_state, tensor_state = state(True), state(False)
    assert (native_state[0]["context_ids"][1] >= 0).all()  # a list filled
    assert (native_state[0]["context_ids"][2:4] == -1).all()  # units 2 and 3 never fire
    assert tensor_state[-1]["sum"][4].isnan()  # the NaN was counted
    for got, want in zip(native_state, tensor_state, strict=True):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, equal_nan=True, msg=name)


def _ranked(top: TopK) -> dict[str, torch.Tensor]:
    return {"values": top.values, "context_ids": top.context_ids, "positions": top.positions,
            "activations": top.activations()}


def _by_key(reservoir: Reservoir) -> dict[str, torch.Tensor]:
    """Within a bin the slots' order is free (the store orders by key): compare in key order."""
    order = reservoir.keys.argsort(dim=2, stable=True)
    state = {name: getattr(reservoir, name).gather(2, order) for name in ("keys", "context_ids", "positions",
                                                                          "values")}
    state["activations"] = reservoir.activations.gather(2, order[..., None].expand_as(reservoir.activations))
    state["exponent"] = reservoir.exponent
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_reduction_equals_the_eager_one(dtype: torch.dtype) -> None:
    """Extremes and firing counts exact, sums to rounding; BOS, padding and an all-padding context never count."""
    for acts, view in batches(dtype, False):
        acts = acts.clone()
        counted = view.counted.clone()
        acts[-1, 5:] = 1e4  # padding's values must not count
        counted[-1, 5:] = False
        counted[0] = False  # a context with nothing counted: -inf and inf, as the eager reduction gives
        got = reductions.reducer(False, native_loop=True)(acts, counted, 1, True)
        want = reductions.reduce_eager(acts, counted, 1, True)
        for name, g, w in zip(("max", "min", "sum", "sum of squares", "firing"), got, want, strict=True):
            assert g.shape == w.shape, name
            if name in ("max", "min", "firing"):
                assert torch.equal(g, w.to(g.dtype)), name
            else:
                torch.testing.assert_close(g.float(), w.float(), rtol=1e-5, atol=1e-3, msg=name)


def test_without_a_compiler_one_line_says_so_and_the_tensor_code_runs(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FEATUREATLAS_CACHE", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        assert native.library() is None and not native.available(torch.device("cpu"))
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "could not build native.cpp" in err and "tensor operations" in err
    finally:
        native.library.cache_clear()  # the next caller builds (or finds) the real one again
