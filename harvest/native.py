"""The NATIVE backend's loops (accumulators.py), compiled from native.cpp: on CPU, dense units' reduction, top- and
bottom-k, samples and histogram, one loop per list and layer, and sparse units' list merges from their non-zeros.

The tensor code in topk.py and reservoir.py spends some forty small operations per list and layer, each paying
dispatch on a few hundred candidates: with every layer's neurons and residual dimensions that is most of a
batch's update time on a CPU. The reduction streams each thread's contexts row by row, needing no torch.compile;
as it finishes a context it copies out the rows that may enter a list or sample (judged against the lists as the
batch starts), with the positions of their max and min, while the context's block is still in cache
(reduce_and_gather). Each list's loop then looks at each unit's gathered rows only, and copies the contexts that
stay from them, where reading them from the whole layer missed the cache for every token. The histogram's loop
counts each sampled token straight into its column (a tile of units at a time, in counters of its own), where the
tensor code builds a column index per token, then scatters.
It is built with the system's C++ compiler at first use (plain C ABI, no torch headers) into the featureatlas
cache, keyed by its source, the compiler and the CPU, and called through ctypes. Where none builds (no compiler),
or for dtypes it does not read, the tensor code runs instead, as it always does on GPUs. Both give the same
results (tests/test_backends.py). FEATUREATLAS_NATIVE=0 turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from featureatlas.atomic import temp_path_beside
from featureatlas.cachedir import cache_root
from featureatlas.harvest.statistics import FIRST_CODE, HALF

if TYPE_CHECKING:
    from featureatlas.harvest.batchview import BatchView
    from featureatlas.harvest.reservoir import Reservoir
    from featureatlas.harvest.statistics import Statistics
    from featureatlas.harvest.topk import TopK

SOURCE = Path(__file__).with_name("native.cpp")
_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fPIC", "-shared"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def available(device: torch.device) -> bool:
    """Whether dense units' updates on `device` can run natively (building the library on first call)."""
    return device.type == "cpu" and library() is not None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built library, or None (with one line on stderr when a build was tried and failed)."""
    if os.environ.get("FEATUREATLAS_NATIVE", "").strip().lower() in ("0", "off", "false", "no"):
        return None
    compiler = find_compiler()
    if compiler is None:
        print("featureatlas: no C++ compiler found (g++, c++ or $CXX); updating neurons and residual dimensions "
              "with tensor operations instead (slower on CPU)", file=sys.stderr)
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or err
        print(f"featureatlas: could not build {SOURCE.name} with {compiler} ({str(detail).strip()[:200]}); "
              "updating neurons and residual dimensions with tensor operations instead (slower on CPU)",
              file=sys.stderr)
        return None
    rows = [_PTR, ctypes.c_int] + [_I64] * 7 + [_PTR, _I64, _PTR, _PTR, _PTR, _PTR]  # _rows_args
    lib.topk_update.argtypes = rows + [_PTR, _I64, _I64, _PTR, _I64, _PTR, ctypes.c_int, _I64, _I64, _PTR, _PTR,
                                       _PTR, _PTR, _PTR, ctypes.c_int]
    lib.sparse_index.argtypes = [_PTR, ctypes.c_int] + [_I64] * 4 + [_PTR, _I64] + [_PTR] * 9
    lib.sparse_index.restype = _I64
    lib.reduce.argtypes = ([_PTR, ctypes.c_int] + [_I64] * 6 + [_PTR] * 6 + [_PTR, _I64, _PTR, _I64, ctypes.c_int]
                           + [_PTR] * 8 + [ctypes.c_int])
    lib.reduce.restype = _I64
    lib.histogram_update.argtypes = [_PTR, ctypes.c_int] + [_I64] * 7 + [_PTR, _PTR, _I64, _I64, _I64, _PTR,
                                                                         ctypes.c_int]
    lib.reservoir_update.argtypes = rows + [_PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR,
                                            _PTR, _PTR, _PTR, _PTR, ctypes.c_int]
    return lib


def find_compiler() -> str | None:
    """$CXX, or the first of g++, c++ and clang++ on the PATH."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _build(compiler: str) -> Path:
    """cache/native/updates-<hash>.so, compiled once for this CPU; the hash covers the source, the compiler, its
    flags and the CPU's instruction sets. Built for the CPU it runs on (-march=native: the reduction's loops use its
    widest vector lanes), or for the baseline where the compiler refuses that."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    for flags in (_FLAGS + ["-march=native"], _FLAGS):
        key = hashlib.sha256(SOURCE.read_bytes() + "\0".join([compiler, version, *flags, _cpu()]).encode())
        target = cache_root() / "native" / f"updates-{key.hexdigest()[:16]}.so"
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_path_beside(target)
        built = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(temp)], capture_output=True, text=True)
        if built.returncode == 0:
            os.replace(temp, target)  # concurrent builders (torchrun ranks) each write their own temp, then rename
            return target
        temp.unlink(missing_ok=True)
    raise subprocess.CalledProcessError(built.returncode, built.args, built.stdout, built.stderr)


def _cpu() -> str:
    """The machine and its instruction sets (Linux: /proc/cpuinfo's flags), so that a cache shared between
    different CPUs (a cluster's home folder) never loads code built for another one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    flags = next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
    return f"{platform.machine()} {platform.processor()} {flags}"


def reads(acts: torch.Tensor, stored: torch.Tensor | None = None) -> bool:
    """Whether the loops can read these activations (into lists of `stored`'s dtype: they copy them as they are)."""
    return acts.dtype in _DTYPES and acts.device.type == "cpu" and (stored is None or stored.dtype == acts.dtype)


def reduce(acts: torch.Tensor, counted: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """reductions.reduce_eager's results for activations whose units are innermost (reads(acts) and unit stride
    1): context max and min [batch, units] (float32), the counted tokens' sum and sum of squares (float64) and
    firing count [units]."""
    return _reduce(acts, counted)[0]


class Gathered(NamedTuple):
    """Rows the reduction copied out of the batch while each context was in cache: every (batch row, unit) that
    may enter a list or sample (native.cpp's Gather), for the merges to copy from instead of the whole layer."""
    pairs: torch.Tensor     # [n] int64 ascending: row * units + unit
    rows: torch.Tensor      # [n, tokens] in the activations' dtype
    extremes: torch.Tensor  # [n, 2] int64: the first counted positions of each row's max and min (-1: none)


def reduce_and_gather(acts: torch.Tensor, view: BatchView, top: TopK, bottom: TopK | None,
                      samples: list[Reservoir]) -> tuple[tuple[torch.Tensor, ...], Gathered]:
    """reduce's results, and the rows that may enter `top`, `bottom` (minus the context min its score) or a
    sample as the lists stand before this batch's merges: pass them to topk_update and reservoir_update."""
    for part in (top, bottom, *samples):
        if part is not None:
            _contiguous(part, part.STATE)
    batch, tokens, units = acts.shape
    pairs, rows, extremes = _scratch(batch * units, tokens, acts.dtype)
    arrays = [(ctypes.c_int64 * 2)(*(getattr(s, name) for s in samples)) for name in ("n_bins", "per_bin")]
    arrays += [(ctypes.c_void_p * 2)(*(getattr(s, name).data_ptr() for s in samples)) for name in ("exponent", "keys")]
    keys = view.keys.contiguous()  # held until the call returns
    reduced, n = _reduce(acts, view.counted, (
        top.values.data_ptr(), top.k, bottom.values.data_ptr() if bottom is not None else 0,
        bottom.k if bottom is not None else 0, len(samples), *arrays, keys.data_ptr(), pairs.data_ptr(),
        rows.data_ptr(), extremes.data_ptr()))
    return reduced, Gathered(pairs[:n], rows[:n * tokens].view(n, tokens), extremes[:n])


def _reduce(acts: torch.Tensor, counted: torch.Tensor, lists: tuple = (0,) * 13
            ) -> tuple[tuple[torch.Tensor, ...], int]:
    """native.cpp's reduce: its results, and how many rows it gathered (lists: what reduce_and_gather passes;
    by default none, and nothing is gathered)."""
    lib = _loaded()
    batch, tokens, units = acts.shape
    high, low = torch.empty((batch, units)), torch.empty((batch, units))
    sums, squares = torch.zeros(units, dtype=torch.float64), torch.zeros(units, dtype=torch.float64)
    firing = torch.zeros(units, dtype=torch.int64)
    counted = counted.contiguous()
    n = lib.reduce(acts.data_ptr(), _DTYPES[acts.dtype], acts.element_size(), batch, tokens, units, acts.stride(0),
                   acts.stride(1), counted.data_ptr(), high.data_ptr(), low.data_ptr(), sums.data_ptr(),
                   squares.data_ptr(), firing.data_ptr(), *lists, torch.get_num_threads())
    return (high, low, sums, squares, firing), n


_SCRATCH = threading.local()


def _scratch(pairs: int, tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This thread's buffers for up to `pairs` gathered rows, grown as needed and reused by every layer (each
    layer's merges are done with them before the next layer's reduction)."""
    held = getattr(_SCRATCH, "buffers", None)
    if held is None or held[0].numel() < pairs or held[1].numel() < pairs * tokens or held[1].dtype != dtype:
        held = _SCRATCH.buffers = (torch.empty(pairs, dtype=torch.int64), torch.empty(pairs * tokens, dtype=dtype),
                                   torch.empty((pairs, 2), dtype=torch.int64))
    return held


class SparseIndex(NamedTuple):
    """A sparse source's batch for the loops (sparse_index): non-zeros grouped by (batch row, unit) pair."""
    pairs: torch.Tensor      # [n_pairs] int64 ascending: row * units + unit
    starts: torch.Tensor     # [n_pairs + 1] int64: each pair's range of positions and bits
    positions: torch.Tensor  # [nnz] int64
    bits: torch.Tensor       # [nnz] the values, in the activations' dtype
    scores: torch.Tensor     # [units, batch] float32: each firing context's max, -inf where the unit does not fire
    counted_units: torch.Tensor   # the counted non-zeros' units, in the order given (for the statistics)
    counted_values: torch.Tensor  # and their values


def sparse_index(acts: torch.Tensor, nonzeros: torch.Tensor, counted: torch.Tensor) -> SparseIndex:
    """acts [batch, tokens, units] contiguous (reads(acts)); nonzeros: its non-zeros' flat indices, by ascending
    position (within one, in any order)."""
    lib = _loaded()
    batch, tokens, units = acts.shape
    nonzeros, counted = nonzeros.contiguous(), counted.contiguous()
    nnz = nonzeros.numel()
    pairs, starts = torch.empty(nnz, dtype=torch.int64), torch.empty(nnz + 1, dtype=torch.int64)
    positions, bits = torch.empty(nnz, dtype=torch.int64), torch.empty(nnz, dtype=acts.dtype)
    scores = torch.full((units, batch), float("-inf"))
    counted_units, counted_values = torch.empty(nnz, dtype=torch.int64), torch.empty(nnz, dtype=acts.dtype)
    n_counted = torch.zeros(1, dtype=torch.int64)
    values = acts.view(-1)[nonzeros]
    n_pairs = lib.sparse_index(values.data_ptr(), _DTYPES[acts.dtype], acts.element_size(), batch, tokens, units,
                               nonzeros.data_ptr(), nnz, counted.data_ptr(), pairs.data_ptr(), starts.data_ptr(),
                               positions.data_ptr(), bits.data_ptr(), scores.data_ptr(), counted_units.data_ptr(),
                               counted_values.data_ptr(), n_counted.data_ptr())
    m = int(n_counted)
    return SparseIndex(pairs[:n_pairs], starts[:n_pairs + 1], positions, bits, scores, counted_units[:m],
                       counted_values[:m])


def topk_update(top: TopK, acts: torch.Tensor, scores: torch.Tensor, view: BatchView, largest: bool,
                index: SparseIndex | Gathered | None = None) -> None:
    """TopK.update's merge for dense units: scores [batch, units] float32 (each context's max, or minus its min),
    rows copied from acts or from what reduce_and_gather gathered. With a sparse source's index,
    TopK.update_pairs': scores are index.scores, rows come from its pairs."""
    lib = _loaded()
    _contiguous(top, top.STATE)
    scores, counted = scores.float().contiguous(), view.counted.contiguous()  # held until the call returns
    lib.topk_update(*_rows_args(acts, index), scores.data_ptr(), *_score_strides(scores, index),
                    counted.data_ptr(), view.first_counted, view.context_ids.data_ptr(),
                    int(largest), top.k, top.slot_activations.shape[2], top.values.data_ptr(),
                    top.context_ids.data_ptr(), top.positions.data_ptr(), top.slots.data_ptr(),
                    top.slot_activations.data_ptr(), torch.get_num_threads())


def reservoir_update(samples: Reservoir, acts: torch.Tensor, context_max: torch.Tensor, view: BatchView,
                     index: SparseIndex | Gathered | None = None) -> None:
    """Reservoir.update for dense units: context_max [batch, units] float32, rows copied from acts or from what
    reduce_and_gather gathered. With a sparse source's index, Reservoir.update_pairs': context_max is
    index.scores, rows come from its pairs."""
    lib = _loaded()
    _contiguous(samples, samples.STATE)
    context_max, counted = context_max.float().contiguous(), view.counted.contiguous()
    lib.reservoir_update(*_rows_args(acts, index), context_max.data_ptr(), *_score_strides(context_max, index),
                         counted.data_ptr(), view.first_counted, view.context_ids.data_ptr(),
                         view.keys.data_ptr(), samples.n_bins, samples.per_bin, samples.activations.shape[-1],
                         samples.exponent.data_ptr(), samples.keys.data_ptr(), samples.context_ids.data_ptr(),
                         samples.positions.data_ptr(), samples.values.data_ptr(), samples.activations.data_ptr(),
                         torch.get_num_threads())


def histogram_update(statistics: Statistics, acts: torch.Tensor, view: BatchView) -> None:
    """Statistics' histogram for dense units: every token of the contexts whose key is a multiple of
    histogram_every, into counts [N_BINS + 1, units] (the last row takes uncounted positions)."""
    lib = _loaded()
    _contiguous(statistics, ("counts",))
    counted = view.counted.contiguous()
    lib.histogram_update(*_acts_args(acts), counted.data_ptr(), view.keys.data_ptr(), statistics.histogram_every,
                         HALF, FIRST_CODE, statistics.counts.data_ptr(), torch.get_num_threads())


def _loaded() -> ctypes.CDLL:
    """The library, for callers that checked `available` (or `library()`) first."""
    lib = library()
    assert lib is not None
    return lib


def _acts_args(acts: torch.Tensor) -> tuple[int, ...]:
    return (acts.data_ptr(), _DTYPES[acts.dtype], acts.element_size(), *acts.shape, *acts.stride())


def _rows_args(acts: torch.Tensor, index: SparseIndex | Gathered | None) -> tuple[int, ...]:
    """Where entering rows are copied from (native.cpp's Rows): the activations, the index's pairs, or the rows
    the reduction gathered."""
    if index is None:
        return (*_acts_args(acts), 0, 0, 0, 0, 0, 0)
    if isinstance(index, Gathered):
        return (*_acts_args(acts), index.pairs.data_ptr(), index.pairs.numel(), 0, 0, index.rows.data_ptr(),
                index.extremes.data_ptr())
    return (*_acts_args(acts), index.pairs.data_ptr(), index.pairs.numel(), index.starts.data_ptr(),
            index.positions.data_ptr(), index.bits.data_ptr(), 0)


def _score_strides(scores: torch.Tensor, index: SparseIndex | Gathered | None) -> tuple[int, int]:
    """(batch row, unit) strides: dense scores are [batch, units], a sparse index's [units, batch]."""
    sparse = isinstance(index, SparseIndex)
    return (scores.stride(1), scores.stride(0)) if sparse else (scores.stride(0), scores.stride(1))


def _contiguous(part: object, names: tuple[str, ...]) -> None:
    """The loop writes the state in place through raw pointers: every tensor must be dense (a restored checkpoint
    or the tensor path's last merge leaves them so; this makes sure)."""
    for name in names:
        tensor = getattr(part, name)
        if isinstance(tensor, torch.Tensor) and not tensor.is_contiguous():
            setattr(part, name, tensor.contiguous())
