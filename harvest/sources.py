"""Unit sources: which hook a kind of unit reads and how the hooked tensor becomes [batch, tokens, units].

MLP neurons and residual-stream dimensions are the hooked tensor's own dimensions; SAE and transcoder features
are a dictionary's encode of it. All are harvested in the same forward passes, by the same accumulators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from featureatlas.errors import UsageError, setting_name
from featureatlas.harvest.hooks import Hook, resolve_hook
from featureatlas.load.architectures import architecture_of, neurons_of

if TYPE_CHECKING:
    from featureatlas.load.dictionaries import Dictionary


@dataclass
class UnitSource:
    name: str                  # the store's `source` column: 'mlp', 'resid', 'sae:<name>', 'transcoder:<name>'
    kind: str                  # 'mlp' | 'resid' | 'sae' | 'transcoder'
    hook: Hook
    n_units: int
    signed: bool               # keeps bottom examples too
    sparse: bool               # mostly exact zeros: statistics touch only the non-zeros
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: the hooked dimensions are the units
    dictionary: Dictionary | None = None
    output_hook: Hook | None = None  # where the units' output directions live (transcoders: the decoder's hook)

    @property
    def layer(self) -> int:
        return self.hook.layer

    def activations(self, hooked: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
        """[batch, tokens, units]; some models (OPT) flatten batch and tokens inside the MLP."""
        x = hooked.reshape(batch, tokens, -1)
        return x if self.encode is None else self.encode(x)

    def activations_and_nonzeros(self, hooked: torch.Tensor, batch: int, tokens: int
                                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """activations(), and for a dictionary the flat indices of their non-zeros (None for dense units)."""
        if self.dictionary is None:
            return self.activations(hooked, batch, tokens), None
        return self.dictionary.encode_with_nonzeros(hooked.reshape(batch, tokens, -1))


def mlp_sources(backbone: torch.nn.Module, model_type: str, layers: list[int]) -> list[UnitSource]:
    gated = architecture_of(model_type).gated
    sources = []
    for layer in layers:
        hook = resolve_hook(f"blocks.{layer}.mlp.hook_post", backbone, model_type)
        n = neurons_of(backbone.get_submodule(hook.module))
        sources.append(UnitSource("mlp", "mlp", hook, n, signed=gated, sparse=False))
    return sources


def resid_sources(backbone: torch.nn.Module, model_type: str, layers: list[int], d_model: int) -> list[UnitSource]:
    return [UnitSource("resid", "resid", resolve_hook(f"blocks.{layer}.hook_resid_post", backbone, model_type),
                       d_model, signed=True, sparse=False) for layer in layers]


def dictionary_sources(dictionaries: list[tuple[str, Dictionary]], backbone: torch.nn.Module, model_type: str,
                       device: torch.device) -> list[UnitSource]:
    """(name, dictionary) pairs -> sources, checking that each dictionary's hook exists in this model."""
    sources = []
    for name, dictionary in dictionaries:
        try:
            hook = resolve_hook(dictionary.hook_name, backbone, model_type, dictionary.hook_reads)
            out = None
            if dictionary.hook_out_name is not None:
                out_reads = "hook" if dictionary.hook_reads == "hook" else "output"
                out = resolve_hook(dictionary.hook_out_name, backbone, model_type, out_reads)
        except UsageError as err:
            raise UsageError(f"{dictionary.config_file}: {err}") from None
        dictionary.to(device)
        sources.append(UnitSource(f"{dictionary.kind}:{name}", dictionary.kind, hook, dictionary.d_sae,
                                  signed=False, sparse=True, encode=dictionary.encode, dictionary=dictionary,
                                  output_hook=out or hook))
    return sources


def parse_layers(spec: str | None, n_layers: int, setting: str = "layers") -> list[int]:
    """'0,5,10-12' -> [0, 5, 10, 11, 12]; None or 'all' -> every layer. setting: what errors name it."""
    if spec is None or spec.strip() in ("", "all"):
        return list(range(n_layers))
    if spec.strip() == "none":
        return []
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise UsageError(f"{setting_name(setting)} {spec!r}: {part!r} is not a layer number or range like "
                             "10-12") from None
        if not 0 <= first <= last < n_layers:
            raise UsageError(f"{setting_name(setting)} {spec!r}: {part!r} is out of range; this model has layers "
                             f"0-{n_layers - 1}")
        layers.update(range(first, last + 1))
    return sorted(layers)

