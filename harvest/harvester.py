"""One forward pass per batch, with every unit source hooked and feeding its exact top-k accumulator."""

from __future__ import annotations

import torch

from featureatlas.harvest.architectures import blocks_of
from featureatlas.harvest.contexts import Batch
from featureatlas.harvest.sources import UnitSource, mlp_sources
from featureatlas.harvest.topk import TopK


class _StopForward(Exception):
    """Raised after the last harvested layer: later layers and the LM head are never computed."""


class Harvester:
    """Owns the hooks; use as a context manager so they are removed whatever happens."""

    def __init__(self, model: torch.nn.Module, layers: list[int], top_k: int, context_length: int,
                 first_counted: int, accumulators: list[TopK] | None = None):
        """accumulators: state to continue from (one per source, in source order); fresh when None."""
        self.backbone = model.base_model
        model_type = model.config.model_type
        self.device = next(model.parameters()).device
        self.first_counted = first_counted  # 1 when contexts start with BOS, which never counts
        self.sources: list[UnitSource] = mlp_sources(self.backbone, model_type, layers)
        self.accumulators = accumulators or [TopK(s.n_units, top_k, context_length, self.device, model.dtype)
                                             for s in self.sources]
        self._counted = self._context_ids = None
        self._padded = False
        self._handles = [s.module.register_forward_pre_hook(self._reader(s, acc))
                         for s, acc in zip(self.sources, self.accumulators, strict=True)]
        last_block = blocks_of(self.backbone, model_type)[max(layers)]
        self._handles.append(last_block.register_forward_hook(_stop))

    def __enter__(self) -> Harvester:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def step(self, batch: Batch) -> None:
        self._padded = batch.padded  # read by every hook: computed once per batch
        self._counted = batch.counted.to(self.device, non_blocking=True)
        self._context_ids = batch.context_ids.to(self.device, non_blocking=True)
        mask = None
        if self._padded:  # padding is at the end: causal attention never lets real tokens see it anyway
            mask = (torch.arange(batch.input_ids.shape[1])[None, :] < batch.lengths[:, None]).to(self.device)
        with torch.inference_mode():
            try:
                self.backbone(input_ids=batch.input_ids.to(self.device, non_blocking=True), attention_mask=mask,
                              use_cache=False)
            except _StopForward:
                pass

    def referenced_context_ids(self) -> set[int]:
        return set(torch.cat([acc.referenced_context_ids() for acc in self.accumulators]).tolist())

    def _reader(self, source: UnitSource, acc: TopK):
        def read(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            acts = source.activations(args[0], *self._counted.shape)
            acc.update(acts, self._counted, self._context_ids, self.first_counted, self._padded)
        return read


def _stop(module: torch.nn.Module, args: object, output: object) -> None:
    raise _StopForward
