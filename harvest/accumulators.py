"""Everything kept about one source's units, and the backends that update it from each batch.

A source's accumulators are its top-k and bottom-k contexts (topk.py), statistics and histogram (statistics.py),
quantile and random samples (reservoir.py), and for sparse units with Settings.cooccurrence the pairs that fire
together (cooccurrence.py): the parts a checkpoint saves (`parts`, each through its STATE) and
the store is written from (write.py). A backend is how they update; every backend keeps exactly the same state
(tests/test_native.py, test_graphs.py, test_features.py and test_gpu_parity.py compare them):

- TENSOR  lists merged by tensor operations, only the candidates that may enter: any device; the reference.
- NATIVE  on CPU, compiled loops (native.py): dense units' reduction, lists and histogram, sparse units' lists.
- FIXED   dense units' lists merged in shapes that never depend on the data, so a GPU never waits for the host.
- GRAPHS  FIXED, each source's update replayed as one CUDA graph (graphs.py) instead of a hundred-odd launches.
- TRITON  on CUDA, Triton kernels (kernels.py): one fused read of the activations for the extremes, sums, histogram
          and the few candidates that can enter the top and bottom lists, then merges of those alone, and of the
          samples' candidates; replayed as CUDA graphs like GRAPHS.

Sparse units (dictionary features) update from their non-zeros: natively under NATIVE, by tensor operations under
TENSOR, FIXED and GRAPHS (their work is small and data-shaped, which fixed shapes cannot help). Under TRITON the
fused pass reads the encode's dense output instead, as it reads neurons: finding the non-zeros would wait for the
host, and one more read of the encode's output costs about what writing it did. choose_backend picks the backend
once per run; make_accumulators builds every source's accumulators for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum

import torch

from featureatlas.harvest import kernels, native
from featureatlas.harvest.activation_rows import DenseRows, SparseRows
from featureatlas.harvest.batchview import BatchView
from featureatlas.harvest.config import HarvestConfig
from featureatlas.harvest.cooccurrence import CoOccurrence
from featureatlas.harvest.graphs import GraphedUpdates
from featureatlas.harvest.reductions import Reduced, compiled_once, firing, reduce_eager, reducer
from featureatlas.harvest.reservoir import Reservoir, sample_fixed, sample_ranks
from featureatlas.harvest.sources import UnitSource
from featureatlas.harvest.statistics import Columns, Statistics, counted_columns
from featureatlas.harvest.topk import Ranks, Step, TopK, candidate_ranks, merge_fixed


class Backend(Enum):
    TENSOR = "tensor"
    NATIVE = "native"
    FIXED = "fixed"
    GRAPHS = "graphs"
    TRITON = "triton"


def choose_backend(device: torch.device, fixed_shapes: bool | None = None, cuda_graphs: bool = True,
                   native_loops: bool = True, triton: bool = True) -> Backend:
    """The run's one choice: fixed shapes on CUDA (or as fixed_shapes says), replayed as CUDA graphs unless
    cuda_graphs is off; otherwise the native loops where they build for the device, else the tensor code. On CUDA
    with graphs, unless fixed_shapes asks for the tensor form, the Triton kernels where Triton imports."""
    fixed = device.type == "cuda" if fixed_shapes is None else fixed_shapes
    if fixed and fixed_shapes is None and cuda_graphs and triton and kernels.available(device):
        return Backend.TRITON
    if fixed:
        return Backend.GRAPHS if cuda_graphs else Backend.FIXED
    return Backend.NATIVE if native_loops and native.available(device) else Backend.TENSOR


def _harvest_default(name: str) -> int:
    return next(f.default for f in fields(HarvestConfig) if f.name == name)


@dataclass(frozen=True)
class Settings:
    """What every source keeps, and how it is updated (the defaults are the harvest's: harvest/config.py)."""
    top_k: int = _harvest_default("top_k")
    bottom_k: int = _harvest_default("top_k")                 # for signed units
    intervals: int = _harvest_default("intervals")            # quantile intervals (even: see reservoir.py)
    per_interval: int = _harvest_default("per_interval")      # quantile examples per interval
    random: int = _harvest_default("random_examples")         # random examples where the unit fires
    histogram_every: int = _harvest_default("histogram_every")  # dense units: one context in this many
    seed: int = _harvest_default("seed")
    compile: bool = False         # the tensor steps fused by torch.compile (Kernels)
    cooccurrence: bool = False    # sparse units: count pairs firing together (cooccurrence.py); run.py turns it on
    backend: Backend = Backend.TENSOR  # how the accumulators update (choose_backend)


@dataclass(frozen=True)
class Kernels:
    """The tensor steps the backends call, plain or fused by torch.compile (compiled once per process)."""
    reduce: Callable[[torch.Tensor, torch.Tensor, int, bool], Reduced]
    topk_ranks: Ranks
    sample_ranks: Ranks
    merge_fixed: Step
    sample_fixed: Step
    histogram_columns: Columns

    @staticmethod
    def of(compiled: bool) -> Kernels:
        if not compiled:
            return Kernels(reduce_eager, candidate_ranks, sample_ranks, merge_fixed, sample_fixed, counted_columns)
        return Kernels(reducer(True), compiled_once(candidate_ranks), compiled_once(sample_ranks),
                       compiled_once(merge_fixed), compiled_once(sample_fixed), compiled_once(counted_columns))


class Accumulators:
    """One source's parts and results; `update` is the backend's (the subclasses below)."""

    def __init__(self, source: UnitSource, settings: Settings, context_length: int, device: torch.device,
                 dtype: torch.dtype):
        n = source.n_units
        self.kernels = Kernels.of(settings.compile)
        self.top = TopK(n, settings.top_k, context_length, device, dtype)
        self.bottom = TopK(n, settings.bottom_k, context_length, device, dtype) \
            if source.signed and settings.bottom_k else None
        self.statistics = Statistics(n, device, source.sparse, settings.histogram_every)
        self.quantiles = Reservoir(n, settings.intervals, settings.per_interval, context_length, device, dtype) \
            if settings.per_interval and settings.intervals else None
        self.random = Reservoir(n, 1, settings.random, context_length, device, dtype) if settings.random else None
        self.reservoirs = [r for r in (self.quantiles, self.random) if r is not None]
        self.cooccurrence = CoOccurrence(n, device=device) if source.sparse and settings.cooccurrence else None

    wants_nonzeros = False  # whether update reads a sparse source's non-zeros (the Reader finds them with the encode)

    def update(self, acts: torch.Tensor, view: BatchView, nonzeros: torch.Tensor | None = None) -> None:
        """One batch. acts [batch, tokens, units] may be a view of the hooked tensor, valid only during the call;
        nonzeros: a sparse source's flat non-zero indices (None: found here where needed)."""
        raise NotImplementedError

    def referenced_context_ids(self) -> torch.Tensor:
        parts = [self.top, self.bottom, self.quantiles, self.random]
        return torch.cat([p.referenced_context_ids() for p in parts if p is not None])

    def check_state(self) -> None:
        """Raises ValueError, naming the part, where restored state would send an update out of bounds."""
        for name, part in self.parts().items():
            if isinstance(part, (TopK, Reservoir, CoOccurrence)):
                try:
                    part.check_state()
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from None

    def parts(self) -> dict[str, TopK | Reservoir | Statistics | CoOccurrence]:
        """The parts a checkpoint saves and restores, each through its STATE attributes."""
        named = {"top": self.top, "bottom": self.bottom, "statistics": self.statistics, "quantiles": self.quantiles,
                 "random": self.random, "cooccurrence": self.cooccurrence}
        return {name: part for name, part in named.items() if part is not None}


class TensorLists(Accumulators):
    """Dense units (neurons, residual dimensions), TENSOR: each context's max and min (and the statistics' sums)
    come from one reduction shared by every part; per-token activations are gathered only for contexts that
    enter a list."""

    def update(self, acts: torch.Tensor, view: BatchView, nonzeros: torch.Tensor | None = None) -> None:
        self.statistics.count(view)
        self.update_lists(acts, view)

    def update_lists(self, acts: torch.Tensor, view: BatchView) -> None:
        k = self.kernels
        context_max, context_min, *sums = k.reduce(acts, view.counted, view.first_counted, view.padded)
        rows_of = DenseRows(acts)
        self.top.update(rows_of, view, context_max, ranks=k.topk_ranks)
        if self.bottom is not None:
            self.bottom.update(rows_of, view, -context_min, largest=False, ranks=k.topk_ranks)
        self.statistics.update(context_max, context_min, sums)
        self.statistics.count_histogram(acts, view, k.histogram_columns)
        for reservoir in self.reservoirs:
            reservoir.update(rows_of, view, context_max, k.sample_ranks)


class NativeLists(TensorLists):
    """Dense units, NATIVE: the reduction, every list and the histogram in native.py's loops. Activations in a
    dtype the loops do not read go through the tensor code."""

    def update_lists(self, acts: torch.Tensor, view: BatchView) -> None:
        if not native.reads(acts, self.top.slot_activations):
            return super().update_lists(acts, view)
        gathered = None
        if acts.stride(-1) == 1:  # the entering rows gathered by the reduction, while each context is in cache
            (context_max, context_min, *sums), gathered = native.reduce_and_gather(acts, view, self.top, self.bottom,
                                                                                   self.reservoirs)
        else:  # units not innermost: the loops' lists read any strides, their reduction does not
            context_max, context_min, *sums = self.kernels.reduce(acts, view.counted, view.first_counted,
                                                                  view.padded)
        native.topk_update(self.top, acts, context_max, view, True, gathered)
        if self.bottom is not None:
            native.topk_update(self.bottom, acts, -context_min, view, False, gathered)
        self.statistics.update(context_max, context_min, sums)
        native.histogram_update(self.statistics, acts, view)
        for reservoir in self.reservoirs:
            native.reservoir_update(reservoir, acts, context_max, view, gathered)


class FixedShapes(Accumulators):
    """Dense units, FIXED: every unit's lists merged every batch in shapes that never depend on the data, so the
    device never waits for the host."""

    def update(self, acts: torch.Tensor, view: BatchView, nonzeros: torch.Tensor | None = None) -> None:
        self.statistics.count(view)
        self.step(acts, view)

    def step(self, acts: torch.Tensor, view: BatchView) -> None:
        """Tensors only, nothing counted in Python (see Statistics.count): what a CUDA graph records."""
        k = self.kernels
        context_max, context_min, *sums = k.reduce(acts, view.counted, view.first_counted, view.padded)
        self.top.update_fixed(acts, view, context_max, step=k.merge_fixed)
        if self.bottom is not None:
            self.bottom.update_fixed(acts, view, -context_min, largest=False, step=k.merge_fixed)
        self.statistics.update(context_max, context_min, sums)
        self.statistics.count_histogram_fixed(acts, view, k.histogram_columns)
        for reservoir in self.reservoirs:
            reservoir.update_fixed(acts, view, context_max, k.sample_fixed)


class Graphed(FixedShapes):
    """Dense units, GRAPHS: FixedShapes' step replayed as a CUDA graph per batch shape (graphs.py), through
    buffers shared by every source; on a CPU the same path runs eagerly."""

    def __init__(self, source: UnitSource, settings: Settings, context_length: int, device: torch.device,
                 dtype: torch.dtype, graphs: GraphedUpdates, key: int):
        super().__init__(source, settings, context_length, device, dtype)
        self.graphs, self.key = graphs, key

    def update(self, acts: torch.Tensor, view: BatchView, nonzeros: torch.Tensor | None = None) -> None:
        self.statistics.count(view)
        parts = [part for part in self.parts().values() if not isinstance(part, CoOccurrence)]  # data-shaped
        self.graphs.update(self.key, acts, view, parts, self.step)


class TritonLists(Graphed):
    """Dense units, TRITON: kernels.py's fused pass and candidate merges for the extremes, statistics, histogram,
    lists and samples; no host synchronisation, replayed as GRAPHS' are. Where the kernels do
    not run (no Triton; a CPU outside Triton's interpreter), FixedShapes' step."""

    def __init__(self, source: UnitSource, settings: Settings, context_length: int, device: torch.device,
                 dtype: torch.dtype, graphs: GraphedUpdates, key: int):
        super().__init__(source, settings, context_length, device, dtype, graphs, key)
        self.candidates = (kernels.Candidates(), kernels.Candidates())  # top's, bottom's

    def step(self, acts: torch.Tensor, view: BatchView) -> None:
        if not kernels.runs_on(acts, self.top, self.bottom):
            return super().step(acts, view)
        passed = kernels.fused_pass(acts, view, self.statistics, self.top, self.candidates[0], self.bottom,
                                    self.candidates[1])
        kernels.merge(self.top, self.candidates[0], acts, view, passed)
        if self.bottom is not None:
            kernels.merge(self.bottom, self.candidates[1], acts, view, passed, largest=False)
        self.statistics.update(passed.context_max, passed.context_min, passed.sums)  # the histogram is counted
        for reservoir in self.reservoirs:
            kernels.merge_samples(reservoir, acts, view, passed, self.statistics.sparse)


class TritonPairs(TritonLists):
    """Sparse units, TRITON: TritonLists' kernels on the encode's dense output, with sparse statistics (the
    histogram counts the non-zeros alone) and only contexts where a unit fires as candidates, keeping what
    TensorPairs keeps without waiting for the host; co-occurrence is counted from the dense output too
    (CoOccurrence.update_dense). make_accumulators builds it only where the kernels read the source's dtype."""

    def __init__(self, source: UnitSource, settings: Settings, context_length: int, device: torch.device,
                 dtype: torch.dtype, graphs: GraphedUpdates, key: int):
        super().__init__(source, settings, context_length, device, dtype, graphs, key)
        self.most_nonzeros = source.dictionary.most_nonzeros if source.dictionary is not None else None

    def update(self, acts: torch.Tensor, view: BatchView, nonzeros: torch.Tensor | None = None) -> None:
        super().update(acts, view)
        if self.cooccurrence is not None:
            self.cooccurrence.update_dense(acts, view.counted, self.most_nonzeros)


class TensorPairs(Accumulators):
    """Sparse units (dictionary features), TENSOR: everything from the batch's non-zeros, never a pass over the
    dense activations; per-token activations are rebuilt only for contexts that enter (activation_rows.py)."""

    def __init__(self, source: UnitSource, settings: Settings, context_length: int, device: torch.device,
                 dtype: torch.dtype):
        super().__init__(source, settings, context_length, device, dtype)
        self._table: torch.Tensor | None = None

    wants_nonzeros = True

    def update(self, acts: torch.Tensor, view: BatchView, nonzeros: torch.Tensor | None = None) -> None:
        self.statistics.count(view)
        acts = acts.contiguous()
        if nonzeros is None:
            nonzeros = flat_nonzeros(acts)
        self.update_pairs(acts, view, nonzeros)
        if self.cooccurrence is not None:  # from the same non-zeros: no pass over the dense activations
            self.cooccurrence.update(nonzeros, view.counted)

    def update_pairs(self, acts: torch.Tensor, view: BatchView, nonzeros: torch.Tensor) -> None:
        k = self.kernels
        rows_of = SparseRows(acts, nonzeros, self._pair_table(acts.shape[0] * acts.shape[2], acts.device))
        fired = firing(rows_of, view.counted)
        self.statistics.update_sparse(view, fired.units, fired.values)
        self.top.update_pairs(rows_of, view, fired.pair_rows, fired.pair_units, fired.pair_max, k.topk_ranks)
        for reservoir in self.reservoirs:
            reservoir.update_pairs(rows_of, view, fired.pair_rows, fired.pair_units, fired.pair_max,
                                   fired.batch_max, k.sample_ranks)

    def _pair_table(self, size: int, device: torch.device) -> torch.Tensor:
        """SparseRows' scratch, kept between batches (it is left all -1)."""
        if self._table is None or self._table.numel() < size:
            self._table = torch.full((size,), -1, dtype=torch.int32, device=device)
        return self._table


class NativePairs(TensorPairs):
    """Sparse units, NATIVE: the non-zeros grouped by (context, unit) and merged into the lists by native.py's
    loops. Activations in a dtype the loops do not read go through the tensor code."""

    def update_pairs(self, acts: torch.Tensor, view: BatchView, nonzeros: torch.Tensor) -> None:
        if not native.reads(acts, self.top.slot_activations):
            return super().update_pairs(acts, view, nonzeros)
        index = native.sparse_index(acts, nonzeros, view.counted)
        self.statistics.update_sparse(view, index.counted_units, index.counted_values)
        native.topk_update(self.top, acts, index.scores, view, True, index)
        for reservoir in self.reservoirs:
            native.reservoir_update(reservoir, acts, index.scores, view, index)


def flat_nonzeros(acts: torch.Tensor) -> torch.Tensor:
    """A sparse source's flat non-zero indices into acts, where the encode did not give them."""
    return acts.contiguous().view(-1).nonzero().squeeze(1)


_DENSE = {Backend.TENSOR: TensorLists, Backend.NATIVE: NativeLists, Backend.FIXED: FixedShapes}
_SPARSE = {Backend.NATIVE: NativePairs}


def make_accumulators(sources: list[UnitSource], settings: Settings, context_length: int, device: torch.device,
                      dtypes: list[torch.dtype]) -> list[Accumulators]:
    """Every source's accumulators for settings.backend (GRAPHS: sharing one set of graphs and buffers). dtypes:
    each source's activation dtype, in which kept examples store their activations."""
    graphs = GraphedUpdates(device) if settings.backend in (Backend.GRAPHS, Backend.TRITON) else None
    made: list[Accumulators] = []
    for key, (source, dtype) in enumerate(zip(sources, dtypes, strict=True)):
        if source.sparse and settings.backend is Backend.TRITON and settings.top_k and kernels.reads(dtype, device):
            assert graphs is not None
            made.append(TritonPairs(source, settings, context_length, device, dtype, graphs, key))
        elif source.sparse:
            made.append(_SPARSE.get(settings.backend, TensorPairs)(source, settings, context_length, device, dtype))
        elif graphs is not None:
            graphed = TritonLists if settings.backend is Backend.TRITON else Graphed
            made.append(graphed(source, settings, context_length, device, dtype, graphs, key))
        else:
            made.append(_DENSE[settings.backend](source, settings, context_length, device, dtype))
    return made
