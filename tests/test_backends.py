"""Every accumulator backend keeps exactly the state the tensor backend keeps on the CPU (harvest/accumulators.py).

Each backend that exists on this machine (native loops where a compiler builds them, fixed shapes and the CUDA
graphs' path on the CPU, where graphs run eagerly through their buffers; tensor code, fixed shapes and recorded
CUDA graphs on a GPU) is fed the same awkward batches as the CPU's tensor backend: many tied scores, padding, BOS,
a unit's range growing by several powers of two at once, strided activations and every dtype the native loops
read. Lists, samples, histograms, extremes and firing counts must be equal; sums equal to float rounding.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from featureatlas.harvest import kernels, native
from featureatlas.harvest.accumulators import Accumulators, Backend, Settings, choose_backend, make_accumulators
from featureatlas.harvest.batchview import BatchView
from featureatlas.harvest.reservoir import Reservoir
from featureatlas.harvest.statistics import HALF
from featureatlas.harvest.topk import TopK
from featureatlas.store.sampling import sampling_keys

from helpers.batches import UNITS, WIDTH, batches, sparse_batches

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
NATIVE = pytest.mark.skipif(native.find_compiler() is None, reason="no C++ compiler to build harvest/native.cpp")
# (device, backend) pairs compared with the CPU's tensor backend
DENSE = [pytest.param("cpu", Backend.NATIVE, marks=NATIVE, id="cpu-native"),
         pytest.param("cpu", Backend.FIXED, id="cpu-fixed"),
         pytest.param("cpu", Backend.GRAPHS, id="cpu-graphs-eager"),
         pytest.param("cuda", Backend.TENSOR, marks=CUDA, id="cuda-tensor"),
         pytest.param("cuda", Backend.FIXED, marks=CUDA, id="cuda-fixed"),
         pytest.param("cuda", Backend.GRAPHS, marks=CUDA, id="cuda-graphs")]
SPARSE = [pytest.param("cpu", Backend.NATIVE, marks=NATIVE, id="cpu-native"),  # the others share the tensor code
          pytest.param("cuda", Backend.GRAPHS, marks=CUDA, id="cuda")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Samples in bins that keep every firing context, keep one, and one bin for all (random examples)
SETTINGS = [Settings(top_k=5, bottom_k=5, intervals=6, per_interval=8, random=3, histogram_every=2, seed=7),
            Settings(top_k=3, bottom_k=2, intervals=4, per_interval=1, random=1, histogram_every=1, seed=7)]


def accumulators(backend: Backend, device: str, dtype: torch.dtype, settings: Settings, sparse: bool = False
                 ) -> Accumulators:
    source = SimpleNamespace(n_units=UNITS, signed=not sparse, sparse=sparse, dictionary=None)
    settings = Settings(**{**vars(settings), "backend": backend})
    return make_accumulators([source], settings, WIDTH, torch.device(device), [dtype])[0]  # type: ignore[list-item]


def on(view: BatchView, device: str) -> BatchView:
    return BatchView(view.counted.to(device), view.first_counted, view.padded, view.context_ids.to(device),
                     view.keys.to(device), view.n_counted)


def state(acc: Accumulators) -> dict[str, torch.Tensor]:
    """Every part's results on the CPU: lists in rank order, samples in key order (the order within a bin is
    free: the store orders by key)."""
    out = {}
    for name in ("top", "bottom"):
        part = getattr(acc, name)
        if part is not None:
            out |= {f"{name}.{key}": value for key, value in ranked(part).items()}
    for name in ("quantiles", "random"):
        part = getattr(acc, name)
        if part is not None:
            out |= {f"{name}.{key}": value for key, value in by_key(part).items()}
    out |= {f"statistics.{key}": value for key, value in acc.statistics.finish().items()}
    out["statistics.n_tokens"] = torch.tensor(acc.statistics.n_tokens)
    return {key: value.cpu() for key, value in out.items()}


def ranked(top: TopK) -> dict[str, torch.Tensor]:
    return {"values": top.values, "context_ids": top.context_ids, "positions": top.positions,
            "activations": top.activations()}


def by_key(reservoir: Reservoir) -> dict[str, torch.Tensor]:
    order = reservoir.keys.argsort(dim=2, stable=True)
    out = {name: getattr(reservoir, name).gather(2, order) for name in ("keys", "context_ids", "positions", "values")}
    out["activations"] = reservoir.activations.gather(2, order[..., None].expand_as(reservoir.activations))
    out["exponent"] = reservoir.exponent
    return out


def assert_same_state(got: Accumulators, want: Accumulators, prefix: str = "") -> None:
    """Equal, NaN where NaN; the float64 sums to rounding (each form adds in its own order). prefix: only the
    state whose names start with it."""
    assert_same_state_dicts(state(got), state(want), prefix)


def assert_same_state_dicts(got_state: dict[str, torch.Tensor], want_state: dict[str, torch.Tensor],
                            prefix: str = "") -> None:
    assert got_state.keys() == want_state.keys()
    for key, value in want_state.items():
        if not key.startswith(prefix):
            continue
        rtol = 1e-5 if key.startswith(("statistics.sum_activation", "statistics.sum_squares")) else 0
        torch.testing.assert_close(got_state[key], value, rtol=rtol, atol=rtol, equal_nan=True, msg=key)


@pytest.mark.parametrize("device, backend", DENSE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("settings", SETTINGS, ids=["wide", "narrow"])
def test_dense_backends_keep_the_tensor_backends_state(device: str, backend: Backend, dtype: torch.dtype,
                                                       strided: bool, settings: Settings) -> None:
    want = accumulators(Backend.TENSOR, "cpu", dtype, settings)
    got = accumulators(backend, device, dtype, settings)
    with torch.inference_mode():
        for acts, view in batches(dtype, strided):
            want.update(acts, view)
            got.update(acts.to(device), on(view, device))
    assert_same_state(got, want)
    if backend is Backend.NATIVE:  # the histogram's row of left-out tokens: never read, but checkpoints carry it
        assert torch.equal(got.statistics.counts[-1], want.statistics.counts[-1])


@pytest.mark.parametrize("device, backend", DENSE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_backends_count_every_edge_value_alike(device: str, backend: Backend, dtype: torch.dtype) -> None:
    """Histograms, extremes and firing counts of zero, subnormal, huge and infinite activations (whose lists are
    left out: an infinite context max has no sample interval)."""
    want = accumulators(Backend.TENSOR, "cpu", dtype, SETTINGS[1])
    got = accumulators(backend, device, dtype, SETTINGS[1])
    with torch.inference_mode():
        for acts, view in batches(dtype, dtype != torch.float32, edges=True):
            want.update(acts, view)
            got.update(acts.to(device), on(view, device))
    assert_same_state(got, want, prefix="statistics.")
    counts = want.statistics.finish()["counts"]
    assert (counts[:, [0, HALF - 1, HALF + 1, 2 * HALF]].sum(dim=0) > 0).all()  # beyond 2^16, below 2^-16


@NATIVE
def test_native_histogram_of_more_tokens_than_its_counters_hold_between_flushes() -> None:
    """Over 65,535 sampled tokens in one batch (the loop counts a tile of units in 16 bits, then adds them up):
    the same histogram as the tensor code's, the row of left-out tokens too."""
    generator = torch.Generator().manual_seed(2)
    size, tokens = 1100, 64
    acts = (torch.randn((size, tokens, 3), generator=generator) * 4).to(torch.bfloat16)
    acts[:, :, 0] = 0.5  # every token of a unit in one bin: more than 65,535 counts there
    counted = torch.ones((size, tokens), dtype=torch.bool)
    counted[:, 0] = False
    ids = torch.arange(size)
    view = BatchView(counted, 1, False, ids, torch.from_numpy(sampling_keys(ids.numpy(), 7)), int(counted.sum()))
    settings = Settings(top_k=2, bottom_k=1, intervals=0, per_interval=0, random=0, histogram_every=1, seed=7)
    got, want = (make_accumulators([SimpleNamespace(n_units=3, signed=True, sparse=False, dictionary=None)],
                                   Settings(**{**vars(settings), "backend": backend}), tokens,
                                   torch.device("cpu"), [torch.bfloat16])[0] for backend in (Backend.NATIVE,
                                                                                            Backend.TENSOR))
    with torch.inference_mode():
        got.update(acts, view)
        want.update(acts, view)
    assert int(want.statistics.counts[:, 0].max()) == size * (tokens - 1) > 65_535
    assert torch.equal(got.statistics.counts, want.statistics.counts)


@pytest.mark.parametrize("device, backend", SPARSE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("given", [True, False], ids=["nonzeros-given", "nonzeros-found"])
def test_sparse_backends_keep_the_tensor_backends_state(device: str, backend: Backend, dtype: torch.dtype,
                                                        given: bool) -> None:
    want = accumulators(Backend.TENSOR, "cpu", dtype, SETTINGS[0], sparse=True)
    got = accumulators(backend, device, dtype, SETTINGS[0], sparse=True)
    with torch.inference_mode():
        for acts, view, nonzeros in sparse_batches(dtype):
            want.update(acts, view, nonzeros)
            got.update(acts.to(device), on(view, device), nonzeros.to(device) if given else None)
    assert_same_state(got, want)


def test_the_comparisons_are_not_vacuous() -> None:
    """Lists filled, ties met, samples re-binned, and the awkward units do what the comparisons rely on."""
    dense = accumulators(Backend.TENSOR, "cpu", torch.float32, SETTINGS[0])
    for acts, view in batches(torch.float32, False):
        dense.update(acts, view)
    top, quantiles = dense.top, dense.quantiles
    assert (top.context_ids[1:] >= 0).all() and (top.values[:, :-1] == top.values[:, 1:]).any()
    assert (quantiles.exponent[1:] >= 8).all() and (quantiles.context_ids[1:] >= 0).sum() > 2 * UNITS
    assert (quantiles.context_ids[0] == -1).all()  # the unit that never fires keeps nothing
    assert dense.statistics.counts[-1].sum() > 0  # tokens left out: BOS, padding, unsampled contexts
    sparse = accumulators(Backend.TENSOR, "cpu", torch.float32, SETTINGS[0], sparse=True)
    for acts, view, nonzeros in sparse_batches(torch.float32):
        sparse.update(acts, view, nonzeros)
    assert (sparse.top.context_ids[1] >= 0).all()  # a list filled
    assert (sparse.top.context_ids[2:4] == -1).all()  # units 2 and 3 never fire
    assert sparse.statistics.sum[4].isnan()  # the NaN was counted


def test_each_backend_is_its_own_class_chosen_once() -> None:
    """make_accumulators picks the class from the backend and the source's kind; nothing is chosen per batch."""
    kinds = {}
    for backend in Backend:
        for sparse in (False, True):
            kinds[backend, sparse] = type(accumulators(backend, "cpu", torch.float32, SETTINGS[0], sparse)).__name__
    assert kinds == {(Backend.TENSOR, False): "TensorLists", (Backend.TENSOR, True): "TensorPairs",
                     (Backend.NATIVE, False): "NativeLists", (Backend.NATIVE, True): "NativePairs",
                     (Backend.FIXED, False): "FixedShapes", (Backend.FIXED, True): "TensorPairs",
                     (Backend.GRAPHS, False): "Graphed", (Backend.GRAPHS, True): "TensorPairs",
                     (Backend.TRITON, False): "TritonLists", (Backend.TRITON, True): "TensorPairs"}


@pytest.mark.parametrize("options, on_cpu, on_cuda", [
    ({}, Backend.NATIVE, Backend.GRAPHS),
    ({"cuda_graphs": False}, Backend.NATIVE, Backend.FIXED),
    ({"native_loops": False}, Backend.TENSOR, Backend.GRAPHS),
    ({"fixed_shapes": False}, Backend.NATIVE, Backend.TENSOR),
    ({"fixed_shapes": True}, Backend.GRAPHS, Backend.GRAPHS),
    ({"fixed_shapes": True, "cuda_graphs": False}, Backend.FIXED, Backend.FIXED)])
def test_the_options_and_the_device_choose_the_backend(options: dict, on_cpu: Backend, on_cuda: Backend) -> None:
    """Fixed shapes by default on CUDA only, graphs with them unless turned off, and there the Triton kernels where
    they run; the native loops wherever they build (only on CPUs), the tensor code elsewhere."""
    if on_cpu is Backend.NATIVE and native.library() is None:
        on_cpu = Backend.TENSOR  # no compiler here: the fallback the tests of native.py check
    cuda = torch.device("cuda")
    if on_cuda is Backend.GRAPHS and "fixed_shapes" not in options and kernels.available(cuda):
        on_cuda = Backend.TRITON  # a GPU with Triton (tests/test_triton_kernels.py checks the kernels)
    assert choose_backend(torch.device("cpu"), **options) is on_cpu
    assert choose_backend(torch.device("cuda"), **options) is on_cuda


def test_a_nan_in_a_dense_unit_with_samples_on() -> None:
    """A NaN activation (a model overflowing in float16) must not stop the harvest, and every backend treats it
    alike: its context's max and min are NaN (torch's amax), so that context enters no list or sample of the
    unit, and the unit's maximum and sums are NaN."""
    states = []
    for backend in (Backend.TENSOR, Backend.FIXED, Backend.NATIVE):
        acc = accumulators(backend, "cpu", torch.float32, SETTINGS[0])
        for i, (acts, view) in enumerate(batches(torch.float32, True)):
            acts = acts.clone()
            acts[1, 3, 5] = float("nan")
            if i == 2:
                acts[:, 2:4, 6] = float("nan")  # a whole batch's contexts, and two tokens of one
            acc.update(acts, on(view, "cpu"))
        states.append(state(acc))
    assert states[0]["statistics.max_activation"][5:7].isnan().all()
    for other in states[1:]:
        assert_same_state_dicts(other, states[0])
