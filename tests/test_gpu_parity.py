"""The CUDA forms of the harvest against the CPU's, on a GPU: the device operations the updates rely on, the fused
reducer, the Triton kernels' backend (harvest/kernels.py) against the CPU's tensor backend, and a tiny model harvested
on the CPU and on the device (float32 with the Triton kernels, with CUDA graphs of the tensor steps and without
either, compiled and not, through torchrun's launcher, and bfloat16), compared store against store and checked by
`featureatlas verify` on the device and on the CPU.

Skipped without CUDA. What of this runs on a CPU runs there in other files: every accumulator backend against the
CPU's tensor code in test_backends.py (its CUDA cases are the accumulator parity checks), the fixed-shape and
graphs' forms of a whole harvest in test_features.py, torchrun in test_scale_out.py, verify in test_verify.py, the
Triton kernels under Triton's interpreter in test_triton_kernels.py.
bench/device_check.sh runs this file and test_backends.py on a GPU machine before the benchmarks.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_backends import SETTINGS, accumulators, assert_same_state, on

from featureatlas.cli import main
from featureatlas.harvest import kernels
from featureatlas.harvest.accumulators import Backend, Settings, choose_backend
from featureatlas.harvest.batchview import BatchView
from featureatlas.harvest.cooccurrence import CoOccurrence
from featureatlas.harvest.reductions import reduce_eager, reducer
from featureatlas.harvest.statistics import histogram_columns

from helpers.batches import UNITS, batches, sparse_batches
from helpers.stores import TIMING, assert_same_store, query
from helpers.tiny_models import HIDDEN, saelens_sae, save_tiny_model, write_corpus

pytestmark = [pytest.mark.model, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

# Each harvest's options beyond the common ones (see stores)
HARVESTS = {"cpu": ["--device", "cpu", "--dtype", "float32"],
            "cuda": ["--device", "cuda", "--dtype", "float32"],
            "cuda-no-graphs": ["--device", "cuda", "--dtype", "float32", "--cuda-graphs", "off"],
            "cuda-compiled": ["--device", "cuda", "--dtype", "float32", "--compile", "on"],
            "cuda-bf16": ["--device", "cuda", "--dtype", "bfloat16"],
            "cuda-graphs": ["--device", "cuda", "--dtype", "float32"]}
# Environment of a harvest beyond the process's own: cuda-graphs is the fixed-shape tensor step in CUDA graphs
ENV = {"cuda-graphs": {"FEATUREATLAS_TRITON": "0"}}
TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def test_the_device_ops_the_updates_rely_on_match_the_cpu() -> None:
    """Stable sorts with ties (the fixed-shape merges' order), int8 stable argsort, and histogram columns read off
    the float's bits, zero, subnormals, huge values and infinities included."""
    g = torch.Generator().manual_seed(0)
    ties = torch.randint(0, 4, (257, 84), generator=g).float()
    assert torch.equal(ties.sort(dim=1, descending=True, stable=True).indices,
                       ties.cuda().sort(dim=1, descending=True, stable=True).indices.cpu())
    small = torch.randint(0, 2, (257, 21), generator=g).to(torch.int8)
    assert torch.equal(small.argsort(dim=1, stable=True), small.cuda().argsort(dim=1, stable=True).cpu())
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.0**-16, 2.0**16, 3e38, -3e38, math.inf, -math.inf, 1.0, -1.5])
    spread = torch.randn(10_000, generator=g) * 10.0 ** torch.randint(-6, 6, (10_000,), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        values = torch.cat([special, spread]).to(dtype)
        assert torch.equal(histogram_columns(values), histogram_columns(values.cuda()).cpu()), dtype


@pytest.mark.parametrize("flush", [10**9, 40], ids=["one merge", "many merges"])
@pytest.mark.parametrize("top_k", [True, False], ids=["top-k", "any encode"])
def test_dense_co_occurrence_on_the_device_counts_what_the_cpu_counts(flush: int, top_k: bool) -> None:
    """CoOccurrence.update_dense on the GPU (its pairs written at offsets the device works out; without a bound
    from the encode, in room learned and checked a batch later) against the CPU's count from the non-zeros: the
    same pairs, counts, firing counts and nearest."""
    g = torch.Generator().manual_seed(5)
    n, k = 40, 6
    on_device, on_cpu = CoOccurrence(n, flush=flush, device="cuda"), CoOccurrence(n, flush=flush)
    for i in range(5):
        scores = torch.rand(3, 11, n, generator=g)
        most = k if top_k or i < 2 else 3 * k  # more than the room learned so far, from the third batch
        keep = scores >= scores.topk(most, dim=-1).values[..., -1:]
        acts = torch.where(keep & (torch.rand(3, 11, n, generator=g) < 0.7), torch.randn(3, 11, n, generator=g), 0)
        counted = torch.rand(3, 11, generator=g) < 0.8
        on_device.update_dense(acts.cuda(), counted.cuda(), k if top_k else None)
        on_cpu.update(acts.reshape(-1).nonzero().squeeze(1), counted)
    got, want = on_device.nearest(5), on_cpu.nearest(5)
    assert torch.equal(on_device.keys.cpu(), on_cpu.keys) and torch.equal(on_device.counts.cpu(), on_cpu.counts)
    assert torch.equal(on_device.firing.cpu(), on_cpu.firing) and len(on_cpu.keys) > 0
    for device_part, cpu_part in zip(got, want, strict=True):
        assert torch.equal(device_part, cpu_part)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_reducer_on_the_device_equals_the_cpus_eager_one(dtype: torch.dtype, compiled: bool) -> None:
    """Extremes and firing counts exact, sums to float32 rounding of their terms' sizes; torch.compile must build
    on CUDA (a fallback to eager would leave the compiled path unchecked)."""
    g = torch.Generator().manual_seed(1)
    acts = (torch.randn(32, 64, 512, generator=g) * 3).to(dtype)
    counted = torch.ones(32, 64, dtype=torch.bool)
    counted[:, 0] = False
    counted[-2:, 32:] = False  # two short contexts: padded
    want = reduce_eager(acts, counted, 1, True)
    reduce = reducer(compiled)
    got = [t.cpu() for t in reduce(acts.cuda(), counted.cuda(), 1, True)]
    assert not getattr(reduce, "fell_back", False), "torch.compile fell back to eager (see its line on stderr)"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[4].long(), want[4].long())
    sizes = [(acts.float().abs() * counted[..., None]).sum((0, 1)).double(), want[3].double()]
    for g_sum, w_sum, size in zip(got[2:4], want[2:4], sizes, strict=True):
        assert ((g_sum.double() - w_sum.double()).abs() <= 1e-5 * size + 1e-30).all()


@TRITON
def test_cuda_chooses_the_triton_kernels() -> None:
    """Where Triton imports, a CUDA harvest's default; asking for fixed shapes or turning graphs off does not."""
    assert kernels.available(torch.device("cuda"))
    assert choose_backend(torch.device("cuda")) is Backend.TRITON
    assert choose_backend(torch.device("cuda"), fixed_shapes=True) is Backend.GRAPHS
    assert choose_backend(torch.device("cuda"), cuda_graphs=False) is Backend.FIXED


@TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("settings", SETTINGS, ids=["wide", "narrow"])
def test_the_triton_kernels_keep_the_cpu_tensor_backends_state(dtype: torch.dtype, strided: bool,
                                                               settings: Settings) -> None:
    """test_backends.py's awkward batches (ties, padding, BOS, ranges growing, strided activations) through the
    kernels on the device, twice: the second round (the same shapes, later contexts) replays recorded graphs."""
    want = accumulators(Backend.TENSOR, "cpu", dtype, settings)
    got = accumulators(Backend.TRITON, "cuda", dtype, settings)
    assert type(got).__name__ == "TritonLists"
    with torch.inference_mode():
        for shift in (0, 1000):
            for acts, view in batches(dtype, strided):
                view = BatchView(view.counted, view.first_counted, view.padded, view.context_ids + shift, view.keys,
                                 view.n_counted)
                want.update(acts, view)
                got.update(acts.cuda(), on(view, "cuda"))
    assert got.graphs.record, "recording the updates as CUDA graphs failed (see its line on stderr)"
    assert_same_state(got, want)


@TRITON
def test_the_triton_kernels_leave_nan_contexts_out_as_the_tensor_backend_does() -> None:
    """A NaN among a context's counted tokens: its max and min are NaN, it enters no list or sample, and W does not
    grow in that batch."""
    want = accumulators(Backend.TENSOR, "cpu", torch.bfloat16, SETTINGS[1])
    got = accumulators(Backend.TRITON, "cuda", torch.bfloat16, SETTINGS[1])
    with torch.inference_mode():
        for i, (acts, view) in enumerate(batches(torch.bfloat16, False)):
            if i in (1, 3):
                acts = acts.clone()
                acts[1, 4, 5] = acts[0, 2, 6] = float("nan")
            want.update(acts, view)
            got.update(acts.cuda(), on(view, "cuda"))
    assert_same_state(got, want)


@TRITON
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dictionary_features_under_the_kernels_keep_the_cpu_tensor_backends_state(dtype: torch.dtype) -> None:
    """Dictionary features from the encode's dense output alone (no non-zeros given), twice: the second round
    replays recorded graphs."""
    want = accumulators(Backend.TENSOR, "cpu", dtype, SETTINGS[0], sparse=True)
    got = accumulators(Backend.TRITON, "cuda", dtype, SETTINGS[0], sparse=True)
    assert type(got).__name__ == "TritonPairs" and not got.wants_nonzeros
    with torch.inference_mode():
        for shift in (0, 1000):
            for acts, view, nonzeros in sparse_batches(dtype):
                view = BatchView(view.counted, view.first_counted, view.padded, view.context_ids + shift, view.keys,
                                 view.n_counted)
                want.update(acts, view, nonzeros)
                got.update(acts.cuda(), on(view, "cuda"))
    assert got.graphs.record, "recording the updates as CUDA graphs failed (see its line on stderr)"
    assert_same_state(got, want)


@TRITON
@pytest.mark.parametrize("sparse, cooccurrence, most", [(False, False, None), (True, False, None),
                                                        (True, True, UNITS), (True, True, None)],
                         ids=["dense", "dictionary", "top-k dictionary with co-occurrence",
                              "dictionary with co-occurrence"])
def test_replayed_updates_never_wait_for_the_gpu(sparse: bool, cooccurrence: bool, most: int | None) -> None:
    """Once each batch shape has run and been recorded, an update only launches work: nothing in it reads a value
    back from the GPU (torch's sync debug mode makes any such read an error). Dictionary features too, and their
    co-occurrence, counted from the dense output into a device buffer: a top-k dictionary's in room its k bounds,
    any other's in room learned from the batches before (each batch's fit is read at the next, through an event
    that marks an earlier copy done, which the debug mode allows)."""
    settings = Settings(**{**vars(SETTINGS[0]), "cooccurrence": cooccurrence})
    got = accumulators(Backend.TRITON, "cuda", torch.bfloat16, settings, sparse=sparse)
    if cooccurrence:  # as make_accumulators reads it off the dictionary
        got.most_nonzeros = most
        assert not got.wants_nonzeros and got.cooccurrence is not None
    feed = [(acts.cuda(), on(view, "cuda")) for acts, view, _ in sparse_batches(torch.bfloat16)] if sparse else \
        [(acts.cuda(), on(view, "cuda")) for acts, view in batches(torch.bfloat16, False)]
    with torch.inference_mode():
        for shift in (0, 1000, 2000):
            if shift == 2000:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                for acts, view in feed:
                    got.update(acts, BatchView(view.counted, view.first_counted, view.padded,
                                               view.context_ids + shift, view.keys, view.n_counted))
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert got.graphs.record and got.graphs._graphs, "no update was recorded as a CUDA graph"
    if cooccurrence:
        assert len(got.cooccurrence.nearest()[0]) == UNITS and int(got.cooccurrence.firing.sum()) > 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A llama (signed neurons: every example kind), its residual dimensions and a top-k SAE; the harvest options
    every run shares (padded batches: documents end mid-batch)."""
    root = tmp_path_factory.mktemp("parity")
    model, corpus = save_tiny_model("llama", root / "model"), write_corpus(root / "corpus")
    sae = saelens_sae(root / "sae", HIDDEN, "blocks.1.hook_resid_post")
    common = ["--model", str(model), "--corpus", str(corpus), "--layers", "all", "--resid", "all", "--sae",
              f"res1={sae}", "--context-length", "16", "--top-k", "3", "--batch-size", "5", "--intervals", "4",
              "--random-examples", "2", "--logits", "3", "--compile", "off"]
    return root, common


class Stores(dict):
    """Each named harvest's store (HARVESTS), run the first time it is asked for."""

    def __init__(self, root: Path, common: list[str]):
        super().__init__()
        self.root, self.common = root, common

    def __missing__(self, name: str) -> Path:
        out = self.root / f"{name}.duckdb"
        saved = {key: os.environ.get(key) for key in ENV.get(name, {})}
        os.environ.update(ENV.get(name, {}))
        try:
            assert main(["harvest", *self.common, *HARVESTS[name], "--out", str(out)]) == 0, name
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self[name] = out
        return out


@pytest.fixture(scope="module")
def stores(tiny) -> Stores:
    return Stores(*tiny)


def assert_close_stores(cpu: Path, device: Path, share: float = 0.99, rtol: float = 1e-4) -> None:
    """float32 on two devices: the model's matrix products round differently, so a near-tie may rank the other
    way. The same contexts and tokens; at least `share` of the units' example lists identical (contexts and
    positions, rank by rank); values and statistics within rtol of each unit's largest |activation|."""
    assert query(cpu, "SELECT n_tokens, n_contexts FROM runs") == query(device, "SELECT n_tokens, n_contexts FROM runs")
    tokens = "SELECT context_id, token_ids FROM contexts"
    common = dict(query(cpu, tokens)).keys() & dict(query(device, tokens)).keys()
    assert common and all(dict(query(cpu, tokens))[c] == dict(query(device, tokens))[c] for c in common)
    units = "SELECT source, layer, unit, n_tokens, mean, std, min_activation, max_activation FROM statistics"
    a = {row[:3]: row[3:] for row in query(cpu, units)}
    b = {row[:3]: row[3:] for row in query(device, units)}
    assert a.keys() == b.keys()
    scale = {k: max(abs(v[3] or 0.0), abs(v[4] or 0.0)) or 1.0 for k, v in a.items()}
    for key, (n, *values) in a.items():
        assert b[key][0] == n, key
        assert all(x is y is None or abs(x - y) <= rtol * scale[key] for x, y in zip(values, b[key][1:], strict=True)
                   ), key
    lists = ("SELECT source, layer, unit, example_kind, list((context_id, max_position, max_activation) ORDER BY "
             "interval_lo, rank) FROM examples WHERE example_kind IN ('top', 'bottom') GROUP BY ALL")
    left, right = ({row[:4]: row[4] for row in query(path, lists)} for path in (cpu, device))
    assert left.keys() == right.keys()
    same = sum([(c, p) for c, p, _ in left[k]] == [(c, p) for c, p, _ in right[k]] for k in left)
    assert same >= share * len(left), f"only {same} of {len(left)} units' top and bottom lists are identical"
    for key in left:
        if len(left[key]) == len(right[key]):
            assert all(abs(x[2] - y[2]) <= rtol * scale[key[:3]] for x, y in zip(left[key], right[key], strict=True))


def test_float32_on_the_device_writes_the_cpus_store(stores) -> None:
    assert_close_stores(stores["cpu"], stores["cuda"])


@pytest.mark.parametrize("other", ["cuda-no-graphs", "cuda-compiled", "cuda-graphs"])
def test_graphs_and_compiling_change_nothing_on_the_device(stores, other: str) -> None:
    """The same device's forward passes, other update code (the default: the Triton kernels where Triton imports;
    the fixed-shape tensor step without graphs, compiled, and in graphs): the very same store (sums to
    rounding)."""
    assert_same_store(stores["cuda"], stores[other], leave_out=TIMING | {"settings"})


def test_torchrun_on_one_gpu_writes_the_single_process_store(tiny, stores) -> None:
    """One rank (WORLD_SIZE 1) is a plain harvest; two ranks on one GPU cannot run (each needs its own device),
    and two on the CPU are test_scale_out.py's."""
    root, common = tiny
    out = root / "torchrun.duckdb"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr",
                             "127.0.0.1", "--master-port", str(port), "-m", "featureatlas", "harvest", *common,
                             *HARVESTS["cuda"], "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_store(stores["cuda"], out)


@pytest.mark.parametrize("name, device", [("cuda", "cuda"), ("cuda-bf16", "cuda"), ("cuda", "cpu")])
def test_device_stores_verify_clean(stores, name: str, device: str, capsys: pytest.CaptureFixture) -> None:
    """Every sampled example recomputed, on the device and, for float32, on the CPU too: the two agree."""
    assert main(["verify", str(stores[name]), "--device", device, "--sample", "300"]) == 0, capsys.readouterr().err
