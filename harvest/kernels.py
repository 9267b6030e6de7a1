"""The TRITON backend's per-layer update (accumulators.py): one fused read of the activations, then merges of the
few contexts that can enter a list or a sample, all as Triton kernels (triton_kernels.py) on the device.

The tensor forms read a layer's activations several times a batch (the reduction, the histogram's columns, the
fixed-shape merges' gathers) and merge every unit's list every batch in fixed shapes. Here `fused_pass` reads them
once for each context's max and min with their first positions, each unit's sums and firing count, the histogram
of the sampled contexts, and the short lists of candidates: the contexts whose score beats their unit's k-th kept
score, compared on the device. `merge` then touches only units with candidates, and `merge_samples` ranks only
the contexts that fire and beat their bin's largest kept key. Nothing waits for the host, so the GRAPHS machinery
replays the whole update as one CUDA graph.

Triton is imported at first use, never at import: without it (CPU-only installs), or on a CPU without Triton's
interpreter, `runs_on` is False and the backend runs the fixed-shape tensor step instead. TRITON_INTERPRET=1 runs
the kernels on CPU tensors through the interpreter (slowly: tests only). FEATUREATLAS_TRITON=0 turns them off.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

from featureatlas.harvest.batchview import BatchView
from featureatlas.harvest.reservoir import Reservoir
from featureatlas.harvest.statistics import FIRST_CODE, HALF, Statistics
from featureatlas.harvest.topk import TopK

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK_T, _BLOCK_U, _CHUNK = 16, 128, 32
_TILE = 2048  # merge_samples copies rows in blocks of at most this many activations


def _off() -> bool:
    return os.environ.get("FEATUREATLAS_TRITON", "").strip().lower() in ("0", "off", "false", "no")


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


_imported: list[tuple[ModuleType | None, bool]] = []  # (triton_kernels or None, interpreted), once imported


def _module(importing: bool = True) -> tuple[ModuleType | None, bool]:
    """(triton_kernels, whether its kernels are the interpreter's), imported once: Triton reads TRITON_INTERPRET
    as the module's @triton.jit decorators run. None where Triton does not import (or, importing False, where it
    was not imported yet)."""
    if not _imported:
        if not importing:
            return None, False
        try:
            module: ModuleType | None = importlib.import_module("featureatlas.harvest.triton_kernels")
        except (ImportError, RuntimeError):
            module = None
        _imported.append((module, interpreting()))
    return _imported[0]


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: CUDA with Triton, or a CPU with the kernels imported under
    Triton's interpreter (tests only; never imported for it unless TRITON_INTERPRET is set)."""
    if _off():
        return False
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        module, interpreted = _module()
        return module is not None and not interpreted and _runs_on_gpu(torch.cuda.current_device()
                                                                       if device.index is None else device.index)
    module, interpreted = _module(importing=interpreting())
    return device.type == "cpu" and module is not None and interpreted


@functools.cache
def _runs_on_gpu(index: int) -> bool:
    """Whether both kernels build and give the right lists on GPU `index`: a GPU Triton does not support, or a
    broken toolchain, fails here once, with one line on stderr, instead of in the middle of a harvest."""
    problem = self_check(torch.device("cuda", index))
    if problem is not None:
        print(f"featureatlas: the Triton kernels do not run on this GPU ({problem}); updating with the tensor step "
              "in CUDA graphs instead (FEATUREATLAS_TRITON=0 skips trying)", file=sys.stderr)
    return problem is None


def self_check(device: torch.device) -> str | None:
    """The kernels on a two-context batch: None where they give the right lists, else what went wrong."""
    try:
        acts = torch.arange(24, dtype=torch.float32, device=device).reshape(2, 3, 4)
        view = BatchView(torch.ones((2, 3), dtype=torch.bool, device=device), 0, False,
                         torch.arange(2, device=device), torch.zeros(2, dtype=torch.int64, device=device), 6)
        top, scratch = TopK(4, 1, 3, device, torch.float32), Candidates()
        samples = Reservoir(4, 2, 1, 3, device, torch.float32)
        passed = fused_pass(acts, view, Statistics(4, device, sparse=False), top, scratch)
        merge(top, scratch, acts, view, passed)
        merge_samples(samples, acts, view, passed)
        # the later context, at its last token; in the samples, each context in its half of W = 32
        if (top.context_ids.eq(1).all() and top.positions.eq(2).all() and samples.positions.eq(2).all()
                and samples.context_ids[:, :, 0].eq(torch.tensor([0, 1], device=device)).all()):
            return None
        return "they gave wrong lists in a check"
    except Exception as err:  # noqa: BLE001 - Triton's compile and launch failures come as many types
        return f"{type(err).__name__}: {err}"[:300]


def runs_on(acts: torch.Tensor, *lists: TopK | None) -> bool:
    """Whether these activations (of a dtype the kernels read) and lists (k of at least 1) go through the
    kernels; elsewhere the backend runs the tensor step."""
    return acts.dim() == 3 and reads(acts.dtype, acts.device, *lists)


def reads(dtype: torch.dtype, device: torch.device, *lists: TopK | None) -> bool:
    """Whether activations of this dtype on this device, and these lists, go through the kernels."""
    return dtype in _DTYPES and all(t is None or t.k >= 1 for t in lists) and available(device)


@dataclass(frozen=True)
class Passed:
    """fused_pass's results for one batch: what the statistics and samples take, and the positions the merges
    write."""
    context_max: torch.Tensor   # [batch, units] float32 over counted positions (NaN where one is NaN)
    context_min: torch.Tensor   # [batch, units] float32
    max_at: torch.Tensor        # [batch, units] int32: the first counted position reaching the max
    min_at: torch.Tensor        # [batch, units] int32: and the min
    sums: list[torch.Tensor]    # [units] each: sum, sum of squares (float64) and firing count (int64)


class Candidates:
    """Per list, scratch the fused pass fills and the merge empties: each unit's count and rows of candidates.
    Kept between batches (a recorded CUDA graph reads and writes the same memory every replay)."""

    def __init__(self) -> None:
        self._made: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def of(self, units: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (units, batch, device)
        if key not in self._made:
            self._made[key] = (torch.zeros(units, dtype=torch.int32, device=device),
                               torch.empty((units, batch), dtype=torch.int32, device=device))
        return self._made[key]


def fused_pass(acts: torch.Tensor, view: BatchView, statistics: Statistics, top: TopK, top_scratch: Candidates,
               bottom: TopK | None = None, bottom_scratch: Candidates | None = None) -> Passed:
    """One read of acts [batch, tokens, units] (any strides; runs_on(acts)): the batch's extremes and sums, the
    histogram counted into statistics.counts, and each list's candidates into its scratch. Sparse statistics
    (dictionary features) count only the non-zeros in the histogram and list only contexts that fire."""
    kernels = _loaded()
    batch, tokens, units = acts.shape
    device = acts.device
    context_max = torch.empty((batch, units), device=device)
    context_min = torch.empty((batch, units), device=device)
    max_at = torch.empty((batch, units), dtype=torch.int32, device=device)
    min_at = torch.empty((batch, units), dtype=torch.int32, device=device)
    partial = torch.empty((3, batch, units), device=device)
    counted = view.counted.contiguous().view(torch.uint8)
    top_count, top_rows = top_scratch.of(units, batch, device)
    _contiguous(statistics, "counts")
    _contiguous(top, "values")
    bottom_list, bottom_count, bottom_rows = top, top_count, top_rows  # never read unless there is a bottom list
    if bottom is not None and bottom_scratch is not None:
        _contiguous(bottom, "values")
        bottom_list = bottom
        bottom_count, bottom_rows = bottom_scratch.of(units, batch, device)
    block_u = min(_BLOCK_U, next_power_of_2(units))
    grid = (batch, -(-units // block_u))
    kernels.fused_pass[grid](
        acts, *acts.stride(), counted, view.keys, statistics.histogram_every,
        context_max, context_min, max_at, min_at, partial, statistics.counts,
        top.values, top_count, top_rows, bottom_list.values, bottom_count, bottom_rows, batch, tokens, units, top.k,
        bottom_list.k, BF16=acts.dtype == torch.bfloat16, BOTTOM=bottom_list is not top, SPARSE=statistics.sparse,
        HALF=HALF, FIRST_CODE=FIRST_CODE, BLOCK_T=min(_BLOCK_T, next_power_of_2(tokens)), BLOCK_U=block_u)
    sums = [partial[0].sum(dim=0, dtype=torch.float64), partial[1].sum(dim=0, dtype=torch.float64),
            partial[2].sum(dim=0, dtype=torch.float64).long()]
    return Passed(context_max, context_min, max_at, min_at, sums)


def merge(top: TopK, scratch: Candidates, acts: torch.Tensor, view: BatchView, passed: Passed, largest: bool = True
          ) -> None:
    """The candidates fused_pass listed for `top` merged into it in place (largest False: a bottom list, scored by
    minus each context's min)."""
    kernels = _loaded()
    batch, tokens, units = acts.shape
    count, rows = scratch.of(units, batch, acts.device)
    for name in top.STATE:
        _contiguous(top, name)
    width = top.slot_activations.shape[2]
    kernels.merge_candidates[(units,)](
        passed.context_max if largest else passed.context_min, passed.max_at if largest else passed.min_at,
        count, rows, view.context_ids, acts, *acts.stride(), top.values, top.context_ids, top.positions, top.slots,
        top.slot_activations, batch, tokens, units, top.k, width,
        NEGATE=not largest, BLOCK_B=next_power_of_2(batch), BLOCK_K=next_power_of_2(top.k),
        BLOCK_W=next_power_of_2(max(width, tokens)), CHUNK=min(_CHUNK, next_power_of_2(batch)),
        num_warps=warps(next_power_of_2(batch) * next_power_of_2(top.k)))


def merge_samples(samples: Reservoir, acts: torch.Tensor, view: BatchView, passed: Passed, sparse: bool = False
                  ) -> None:
    """Reservoir.update of `samples` in place, from fused_pass's context maxima and their first positions (sparse:
    update_pairs', whose W grows with the contexts that fire even where another context has a NaN)."""
    kernels = _loaded()
    batch, tokens, units = acts.shape
    for name in samples.STATE:
        _contiguous(samples, name)
    width = samples.activations.shape[-1]
    block_b, block_w = next_power_of_2(batch), next_power_of_2(max(width, tokens))
    block_e = next_power_of_2(samples.n_bins * samples.per_bin)
    kernels.merge_samples[(units,)](
        passed.context_max, passed.max_at, view.keys, view.context_ids, acts, *acts.stride(), samples.exponent,
        samples.keys, samples.context_ids, samples.positions, samples.values, samples.activations, batch, tokens,
        units, width, N_BINS=samples.n_bins, PER=samples.per_bin, SPARSE=sparse, BLOCK_B=block_b,
        BLOCK_E=block_e, BLOCK_P=next_power_of_2(samples.per_bin), BLOCK_W=block_w, CHUNK=min(_CHUNK, block_b),
        ROWS=max(1, min(block_e, _TILE // block_w)), num_warps=warps(block_b * block_e))


def warps(elements: int) -> int:
    """Warps for a merge program whose widest comparison matrix has this many elements: 4 up to 2,048, 8 up to
    32,768, else 16, so that a large batch's comparisons fit a thread's registers instead of spilling to local
    memory (chosen from the compiled kernels' resource usage: bench/RESULTS.md, "GPU")."""
    return 4 if elements <= 2048 else 8 if elements <= 32768 else 16


def next_power_of_2(n: int) -> int:
    """The smallest power of two at or above n (Triton's block sizes), without importing Triton."""
    return 1 << max(n - 1, 0).bit_length()


def _loaded() -> ModuleType:
    module, _ = _module()
    assert module is not None, "callers check runs_on first"
    return module


def _contiguous(part: object, name: str) -> None:
    """The kernels write state in place through its pointers: it must be dense (as a checkpoint restores it)."""
    tensor = getattr(part, name)
    if not tensor.is_contiguous():
        setattr(part, name, tensor.contiguous())
