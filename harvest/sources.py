"""Unit sources: where the harvest hooks the model and how a hooked tensor becomes [batch, tokens, units].

MLP neurons are the first source; residual dimensions, SAE and transcoder features are further sources that
hook a module and turn its tensor into unit activations, harvested in the same forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featureatlas.errors import UsageError
from featureatlas.harvest.architectures import architecture_of, blocks_of, mlp_out_of, neurons_of


@dataclass
class UnitSource:
    name: str                  # the store's `source` column: 'mlp' for MLP neurons
    layer: int
    n_units: int
    module: torch.nn.Module    # the module whose input carries the activations
    hook: str                  # human-readable: which module, and what is read there

    def activations(self, module_input: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
        """[batch, tokens, units]; some models (OPT) flatten batch and tokens inside the MLP."""
        return module_input.reshape(batch, tokens, self.n_units)


def mlp_sources(backbone: torch.nn.Module, model_type: str, layers: list[int]) -> list[UnitSource]:
    blocks = blocks_of(backbone, model_type)
    arch = architecture_of(model_type)
    sources = []
    for layer in layers:
        proj = mlp_out_of(blocks[layer], model_type)
        sources.append(UnitSource("mlp", layer, neurons_of(proj), proj,
                                  f"{arch.blocks}.{layer}.{arch.mlp_out}:input"))
    return sources


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """'0,5,10-12' -> [0, 5, 10, 11, 12]; None or 'all' -> every layer."""
    if spec is None or spec.strip() in ("", "all"):
        return list(range(n_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise UsageError(f"--layers {spec!r}: {part!r} is not a layer number or range like 10-12") from None
        if not 0 <= first <= last < n_layers:
            raise UsageError(f"--layers {spec!r}: {part!r} is out of range; this model has layers 0-{n_layers - 1}")
        layers.update(range(first, last + 1))
    return sorted(layers)
