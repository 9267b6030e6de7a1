"""One forward pass per batch: every hook read once, every source's activations fed to its accumulators."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection

import torch

from featureatlas.errors import UsageError
from featureatlas.harvest.accumulators import Settings, make_accumulators
from featureatlas.harvest.batchview import BatchView
from featureatlas.harvest.contexts import Batch
from featureatlas.harvest.hooks import read_hook
from featureatlas.harvest.sources import UnitSource
from featureatlas.load.architectures import blocks_of


class _StopForward(Exception):
    """Raised after the last hooked block: later layers and the LM head are never computed."""


class Harvester:
    """Owns the hooks; use as a context manager so they are removed whatever happens."""

    def __init__(self, model: torch.nn.Module, sources: list[UnitSource], settings: Settings, context_length: int,
                 first_counted: int):
        self.backbone = model.base_model
        self.device = next(model.parameters()).device
        self.sources = sources
        self.settings = settings
        self.first_counted = first_counted  # 1 when contexts start with BOS, which never counts
        self.accumulators = make_accumulators(sources, settings, context_length, self.device,
                                              [_activation_dtype(s, model) for s in sources])
        self._view: BatchView | None = None
        self.reader = Reader(model, sources, self._consume,
                             nonzeros={i for i, acc in enumerate(self.accumulators) if acc.wants_nonzeros})

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
        """Each source's update runs in its hook, while the layer's activations are fresh in cache."""
        self.accumulators[index].update(acts, self._view, nonzeros)


class Reader:
    """The one path from token ids to every source's [batch, tokens, units] activations, shared by harvest and
    `verify` so that what is checked is what was harvested. Hooks each (module, reads) once, however many sources
    read it, and stops the forward pass after the last hooked block. consume(i, acts) gets sources[i]'s
    activations; they may be a view of the hooked tensor, valid only during the call. Given nonzeros (a set of
    source indices) it is consume(i, acts, nonzeros), nonzeros being the dictionary's non-zero flat indices for
    those sources (found with the encode) and None for the others."""

    def __init__(self, model: torch.nn.Module, sources: list[UnitSource], consume: Callable[..., None],
                 nonzeros: Collection[int] | None = None):
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
            if self.nonzeros is None:
                self.consume(index, source.activations(tensor, *self._shape))
            elif index in self.nonzeros:
                self.consume(index, *source.activations_and_nonzeros(tensor, *self._shape))
            else:
                self.consume(index, source.activations(tensor, *self._shape), None)


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
                    f"{source.dictionary.config_file}: d_in is {source.dictionary.d_in}, but "
                    f"{source.hook.name} of this model is {width} wide; is it a dictionary for another model?")


def _activation_dtype(source: UnitSource, model: torch.nn.Module) -> torch.dtype:
    """Kept examples store activations as computed: the model's dtype, or the dictionary's."""
    return source.dictionary.dtype if source.dictionary is not None else model.dtype


def _stop(module: torch.nn.Module, args: object, output: object) -> None:
    raise _StopForward
