"""The native loops (harvest/native.py): they build where there is a compiler, their reduction equals the eager
one, without a compiler one line says so and the tensor code runs, and no restored state sends them out of bounds.
That their lists, samples and histograms equal the tensor code's is tests/test_backends.py's (the NATIVE backend),
and the harvest's against brute force with them on and off is test_features.py's and test_harvest.py's."""

from __future__ import annotations

from dataclasses import make_dataclass, replace
from datetime import datetime
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from featureatlas.errors import UsageError
from featureatlas.harvest import native
from featureatlas.harvest.accumulators import Backend, Settings, choose_backend, make_accumulators
from featureatlas.harvest.checkpoint import Checkpointer
from featureatlas.harvest.reductions import reduce_eager
from featureatlas.store.sampling import sampling_keys

from helpers.batches import UNITS, WIDTH, batches

# Skipped only where there is no compiler: where there is one, a native.cpp that does not build fails them.
pytestmark = pytest.mark.skipif(native.find_compiler() is None, reason="no C++ compiler to build harvest/native.cpp")


def test_native_cpp_builds_where_there_is_a_compiler() -> None:
    assert native.library() is not None, "harvest/native.cpp did not build: see the line above on stderr"
    assert choose_backend(torch.device("cpu")) is Backend.NATIVE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_reduction_equals_the_eager_one(dtype: torch.dtype) -> None:
    """Extremes and firing counts exact, sums to rounding; BOS, padding and an all-padding context never count."""
    for acts, view in batches(dtype, False):
        acts = acts.clone()
        counted = view.counted.clone()
        acts[-1, 5:] = 1e4  # padding's values must not count
        counted[-1, 5:] = False
        counted[0] = False  # a context with nothing counted: -inf and inf, as the eager reduction gives
        got = native.reduce(acts, counted)
        want = reduce_eager(acts, counted, 1, True)
        for name, g, w in zip(("max", "min", "sum", "sum of squares", "firing"), got, want, strict=True):
            assert g.shape == w.shape, name
            if name in ("max", "min", "firing"):
                assert torch.equal(g, w.to(g.dtype)), name
            else:
                torch.testing.assert_close(g.float(), w.float(), rtol=1e-5, atol=1e-3, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_reduction_gathers_every_row_that_enters_a_list(dtype: torch.dtype) -> None:
    """Every (context, unit) that enters the top or bottom list or a sample is among the rows the reduction
    gathered (against the lists as the batch starts: samples' bins filled, then W growing by several doublings;
    ties, NaN), each gathered row is its activations and carries the first counted positions of its max and min;
    and few others are."""
    settings = Settings(top_k=3, bottom_k=2, intervals=4, per_interval=1, random=1, histogram_every=2, seed=7,
                        backend=Backend.NATIVE)
    acc = make_accumulators([SimpleNamespace(n_units=UNITS, signed=True, sparse=False)], settings, WIDTH,
                            torch.device("cpu"), [dtype])[0]
    feed = [(acts * 0.01, view) for acts, view in batches(dtype, False)]  # bins filled below the later W
    offset = int(feed[-1][1].context_ids[-1]) + 1
    for acts, view in batches(dtype, False):
        ids = view.context_ids + offset
        feed.append((acts, replace(view, context_ids=ids, keys=torch.from_numpy(sampling_keys(ids.numpy(), 7)))))
    entered_total = gathered_total = 0
    for i, (acts, view) in enumerate(feed):
        acts = acts.clone()
        if i == 7:
            acts[1, 4, 5] = float("nan")
        (high, low, *_), gathered = native.reduce_and_gather(acts, view, acc.top, acc.bottom, acc.reservoirs)
        pairs = {(int(p) // UNITS, int(p) % UNITS) for p in gathered.pairs}
        assert gathered.pairs.tolist() == sorted(gathered.pairs.tolist()) and len(pairs) == len(gathered.pairs)
        positions = torch.arange(acts.shape[1])
        for (b, u), row, (max_at, min_at) in zip(sorted(pairs), gathered.rows, gathered.extremes.tolist(),
                                                 strict=True):
            assert torch.equal(row, acts[b, :, u])
            values = acts[b, :, u].float()
            for extreme, at in ((high[b, u], max_at), (low[b, u], min_at)):
                reaching = positions[view.counted[b] & (values == extreme)]
                assert at == (int(reaching[0]) if len(reaching) else -1)
        acc.update(acts, view)
        row_of = {int(c): b for b, c in enumerate(view.context_ids)}
        for part in (acc.top, acc.bottom, *acc.reservoirs):
            ids = part.context_ids.reshape(UNITS, -1)
            entered = {(row_of[int(c)], u) for u in range(UNITS) for c in ids[u] if int(c) in row_of}
            assert entered <= pairs, (i, sorted(entered - pairs))
            entered_total += len(entered)
        gathered_total += len(pairs)
    assert entered_total >= gathered_total > 0  # rows entering several lists are gathered once


def test_without_a_compiler_one_line_says_so_and_the_tensor_code_runs(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FEATUREATLAS_CACHE", str(tmp_path / "cache"))
    native.library.cache_clear()
    try:
        assert native.library() is None and not native.available(torch.device("cpu"))
        assert choose_backend(torch.device("cpu")) is Backend.TENSOR
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "could not build native.cpp" in err and "tensor operations" in err
    finally:
        native.library.cache_clear()  # the next caller builds (or finds) the real one again


@pytest.mark.parametrize("key, value", [("0.top.slots", 10**9), ("0.bottom.slots", -1), ("0.top.slots", None),
                                        ("0.quantiles.exponent", 2**40), ("0.random.exponent", -1000)])
def test_a_tampered_checkpoint_cannot_send_the_loops_out_of_bounds(tmp_path, key: str, value: int | None) -> None:
    """The loops write kept examples through raw pointers at each list's slots, and bin samples by their W: a
    checkpoint placed beside --out whose slots or exponents are out of range (or slots repeated) is refused in one
    line before any update runs, where it would have written outside the lists (a crash, or worse)."""
    source = SimpleNamespace(n_units=UNITS, signed=True, sparse=False)
    settings = Settings(top_k=5, bottom_k=5, intervals=4, per_interval=2, random=2, backend=Backend.NATIVE)
    config = make_dataclass("Config", [("top_k", int)])(5)

    def accumulators() -> list:
        return make_accumulators([source], settings, WIDTH, torch.device("cpu"), [torch.float32])

    saved = accumulators()
    for acts, view in batches(torch.float32, False):
        saved[0].update(acts, view)
    out = tmp_path / "s.duckdb"
    Checkpointer(out, 1).save(config, saved, 4, 10, 1.0, datetime(2024, 1, 2))
    assert Checkpointer(out, None).load(config, accumulators())["n_tokens"] == 10  # untampered: restored
    with safe_open(str(out) + ".checkpoint", framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    flat = tensors[key].view(-1)
    at = tensors[key].shape[-1] if tensors[key].dim() > 1 else 1  # unit 1's first entry
    flat[at] = flat[at + 1] if value is None else value  # None: a slot repeated
    save_file(tensors, str(out) + ".checkpoint", metadata=metadata)
    with pytest.raises(UsageError) as refused:
        Checkpointer(out, None).load(config, accumulators())
    message = str(refused.value)
    assert "\n" not in message and key.split(".")[1] in message and "remove it and harvest again" in message
