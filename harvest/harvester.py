"""One forward pass per batch: every hook read once, every source's activations fed to its accumulators."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from featureatlas.errors import UsageError
from featureatlas.harvest import native
from featureatlas.harvest.activation_rows import DenseRows, SparseRows
from featureatlas.harvest.batchview import BatchView
from featureatlas.harvest.contexts import Batch
from featureatlas.harvest.graphs import GraphedUpdates
from featureatlas.harvest.hooks import read_hook
from featureatlas.harvest.reductions import firing, reducer
from featureatlas.harvest.reservoir import Reservoir
from featureatlas.harvest.sources import UnitSource
from featureatlas.harvest.statistics import Statistics
from featureatlas.harvest.topk import TopK
from featureatlas.load.architectures import blocks_of


class _StopForward(Exception):
    """Raised after the last hooked block: later layers and the LM head are never computed."""


@dataclass(frozen=True)
class Settings:
    top_k: int = 20
    bottom_k: int = 20            # for signed units
    intervals: int = 12           # quantile intervals (even: see reservoir.py)
    per_interval: int = 2         # quantile examples per interval
    random: int = 4               # random examples where the unit fires
    histogram_every: int = 32     # dense units: the histogram counts one context in this many (cost: docs/harvest.md)
    seed: int = 0
    compile: bool = False         # fuse the per-batch steps with torch.compile (reductions.py)
    fixed_shapes: bool = False    # dense units' lists in data-independent shapes: no host syncs (for CUDA)
    cuda_graphs: bool = False     # with fixed shapes on CUDA: dense units' updates replayed as CUDA graphs
    native: bool = True           # on CPU: dense units updated by compiled loops (native.py), where they build


class Accumulators:
    """Everything kept about one source's units; each part updates from the same activations."""

    def __init__(self, source: UnitSource, settings: Settings, context_length: int, device: torch.device,
                 dtype: torch.dtype):
        n, fixed = source.n_units, settings.fixed_shapes and not source.sparse
        form = (fixed, settings.compile)  # fixed shapes compile into a few kernels a step
        natively = settings.native and not fixed and native.available(device)
        loop = natively and not source.sparse
        self.native_pairs = natively and source.sparse  # sparse units' lists merge in native.py's loops too
        self.top = TopK(n, settings.top_k, context_length, device, dtype, *form, native=loop)
        self.bottom = TopK(n, settings.bottom_k, context_length, device, dtype, *form, native=loop) \
            if source.signed and settings.bottom_k else None
        self.statistics = Statistics(n, device, source.sparse, settings.histogram_every, *form, native=loop)
        self.quantiles = Reservoir(n, settings.intervals, settings.per_interval, context_length, device, dtype,
                                   *form, native=loop) if settings.per_interval and settings.intervals else None
        self.random = Reservoir(n, 1, settings.random, context_length, device, dtype, *form, native=loop) \
            if settings.random else None
        self.sparse = source.sparse
        self.reduce = reducer(settings.compile, loop)
        self._table: torch.Tensor | None = None

    def update(self, acts: torch.Tensor, view: BatchView, nonzeros: torch.Tensor | None = None) -> None:
        """Dense units: each context's max and min (and the statistics' sums) come from one reduction shared by
        all. Sparse units (nonzeros: the flat indices of acts' non-zeros): everything comes from the non-zeros.
        Either way, per-token activations are gathered only for contexts that enter a list."""
        self.statistics.count(view)
        if self.sparse:
            self._update_sparse(acts, view, nonzeros)
        else:
            self.update_dense(acts, view)

    def _update_sparse(self, acts: torch.Tensor, view: BatchView, nonzeros: torch.Tensor | None) -> None:
        reservoirs = [r for r in (self.quantiles, self.random) if r is not None]
        acts = acts.contiguous()
        if nonzeros is None:
            nonzeros = acts.view(-1).nonzero().squeeze(1)
        if self.native_pairs and native.reads(acts, self.top.slot_activations):
            index = native.sparse_index(acts, nonzeros, view.counted)
            self.statistics.update_sparse(view, index.counted_units, index.counted_values)
            native.topk_update(self.top, acts, index.scores, view, True, index)
            for reservoir in reservoirs:
                native.reservoir_update(reservoir, acts, index.scores, view, index)
            return
        rows_of = SparseRows(acts, nonzeros, self._pair_table(acts.shape[0] * acts.shape[2], acts.device))
        fired = firing(rows_of, view.counted)
        self.statistics.update_sparse(view, fired.units, fired.values)
        self.top.update_pairs(rows_of, view, fired.pair_rows, fired.pair_units, fired.pair_max)
        for reservoir in reservoirs:
            reservoir.update_pairs(rows_of, view, fired.pair_rows, fired.pair_units, fired.pair_max,
                                   fired.batch_max)

    def update_dense(self, acts: torch.Tensor, view: BatchView) -> None:
        """Tensors only, nothing counted in Python (see Statistics.count): what a CUDA graph records."""
        reservoirs = [r for r in (self.quantiles, self.random) if r is not None]
        context_max, context_min, *sums = self.reduce(acts, view.counted, view.first_counted, view.padded)
        rows_of = DenseRows(acts)
        self.top.update(rows_of, view, context_max)
        if self.bottom is not None:
            self.bottom.update(rows_of, view, -context_min, largest=False)
        self.statistics.update(acts, view, context_max, context_min, sums)
        for reservoir in reservoirs:
            reservoir.update(rows_of, view, context_max)

    def _pair_table(self, size: int, device: torch.device) -> torch.Tensor:
        """SparseRows' scratch, kept between batches (it is left all -1)."""
        if self._table is None or self._table.numel() < size:
            self._table = torch.full((size,), -1, dtype=torch.int32, device=device)
        return self._table

    def referenced_context_ids(self) -> torch.Tensor:
        parts = [self.top, self.bottom, self.quantiles, self.random]
        return torch.cat([p.referenced_context_ids() for p in parts if p is not None])

    def parts(self) -> dict[str, TopK | Reservoir | Statistics]:
        """The parts a checkpoint saves and restores, each through its STATE attributes."""
        named = {"top": self.top, "bottom": self.bottom, "statistics": self.statistics, "quantiles": self.quantiles,
                 "random": self.random}
        return {name: part for name, part in named.items() if part is not None}


class Harvester:
    """Owns the hooks; use as a context manager so they are removed whatever happens."""

    def __init__(self, model: torch.nn.Module, sources: list[UnitSource], settings: Settings, context_length: int,
                 first_counted: int):
        self.backbone = model.base_model
        self.device = next(model.parameters()).device
        self.sources = sources
        self.settings = settings
        self.first_counted = first_counted  # 1 when contexts start with BOS, which never counts
        self.accumulators = [Accumulators(s, settings, context_length, self.device, _activation_dtype(s, model))
                             for s in sources]
        self._view: BatchView | None = None
        self.graphs = GraphedUpdates(self.device) if settings.cuda_graphs and settings.fixed_shapes else None
        self.reader = Reader(model, sources, self._consume, nonzeros=True)

    def attach(self) -> None:
        """Hook the model (see Reader)."""
        self.reader.attach()

    def detach(self) -> None:
        self.reader.detach()

    def __enter__(self) -> Harvester:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def step(self, batch: Batch) -> None:
        self._view = BatchView.of(batch, self.first_counted, self.settings.seed, self.device)
        self.reader.run(batch)

    def referenced_context_ids(self) -> set[int]:
        return set(torch.cat([acc.referenced_context_ids() for acc in self.accumulators]).tolist())

    def _consume(self, index: int, acts: torch.Tensor, nonzeros: torch.Tensor | None) -> None:
        """Each source's update runs in its hook, while the layer's activations are fresh in cache. Holding a batch's
        dense activations for the end of the forward pass instead, as this once did, was 3% slower in bfloat16 with
        the native loops and as fast in float32, for up to 512 MiB more memory (only the tensor code gained, 3%)."""
        accumulators = self.accumulators[index]
        if self.graphs is not None and not self.sources[index].sparse:
            accumulators.statistics.count(self._view)
            self.graphs.update(index, acts, self._view, list(accumulators.parts().values()),
                               accumulators.update_dense)
            return
        accumulators.update(acts, self._view, nonzeros)


class Reader:
    """The one path from token ids to every source's [batch, tokens, units] activations, shared by harvest and
    `verify` so that what is checked is what was harvested. Hooks each (module, reads) once, however many sources
    read it, and stops the forward pass after the last hooked block. consume(i, acts) gets sources[i]'s
    activations; they may be a view of the hooked tensor, valid only during the call. With nonzeros=True it is
    consume(i, acts, nonzeros), nonzeros being a dictionary's non-zero flat indices (None for dense units)."""

    def __init__(self, model: torch.nn.Module, sources: list[UnitSource], consume: Callable[..., None],
                 nonzeros: bool = False):
        self.backbone = model.base_model
        self.device = next(model.parameters()).device
        self.sources = sources
        self.consume = consume
        self.nonzeros = nonzeros
        self._shape = (0, 0)
        self._handles: list = []
        self._last_layer = max(s.hook.layer for s in sources)
        self.attach()

    def attach(self) -> None:
        """Hook the model: one hook per (module, reads), however many sources read it."""
        readers = defaultdict(list)
        for index, source in enumerate(self.sources):
            readers[source.hook.module, source.hook.reads].append((index, source))
        for consumers in readers.values():
            self._handles.append(read_hook(self.backbone, consumers[0][1].hook,
                                           lambda tensor, consumers=consumers: self._read(consumers, tensor)))
        last_block = blocks_of(self.backbone, self.backbone.config.model_type)[self._last_layer]
        self._handles.append(last_block.register_forward_hook(_stop))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, batch: Batch) -> None:
        """One forward pass of the batch (right-padded; its mask only when it is padded, as harvest runs it)."""
        self._shape = tuple(batch.input_ids.shape)
        mask = None
        if batch.padded:  # padding is at the end: causal attention never lets real tokens see it anyway
            mask = (torch.arange(batch.input_ids.shape[1])[None, :] < batch.lengths[:, None]).to(self.device)
        with torch.inference_mode():
            try:
                self.backbone(input_ids=batch.input_ids.to(self.device, non_blocking=True), attention_mask=mask,
                              use_cache=False)
            except _StopForward:
                pass

    def _read(self, consumers: list[tuple[int, UnitSource]], tensor: torch.Tensor) -> None:
        for index, source in consumers:
            if self.nonzeros:
                self.consume(index, *source.activations_and_nonzeros(tensor, *self._shape))
            else:
                self.consume(index, source.activations(tensor, *self._shape))


def check_widths(model: torch.nn.Module, sources: list[UnitSource]) -> None:
    """One two-token forward pass: every dictionary's d_in must equal the width of the tensor it reads."""
    widths: dict[tuple[str, str], int] = {}
    backbone = model.base_model
    handles = [read_hook(backbone, source.hook, lambda tensor, key=(source.hook.module, source.hook.reads):
                         widths.setdefault(key, tensor.shape[-1])) for source in sources]
    try:
        with torch.inference_mode():
            backbone(input_ids=torch.zeros((1, 2), dtype=torch.int64, device=next(model.parameters()).device),
                     use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for source in sources:
        if source.dictionary is not None:
            width = widths[(source.hook.module, source.hook.reads)]
            if width != source.dictionary.d_in:
                raise UsageError(
                    f"{source.dictionary.path / 'cfg.json'}: d_in is {source.dictionary.d_in}, but "
                    f"{source.hook.name} of this model is {width} wide; is it a dictionary for another model?")


def _activation_dtype(source: UnitSource, model: torch.nn.Module) -> torch.dtype:
    """Kept examples store activations as computed: the model's dtype, or the dictionary's."""
    return source.dictionary.dtype if source.dictionary is not None else model.dtype


def _stop(module: torch.nn.Module, args: object, output: object) -> None:
    raise _StopForward
