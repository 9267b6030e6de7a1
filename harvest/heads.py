"""Attention heads as units: one per query head, its activation at a token the L2 norm of what it writes to the
residual stream there, ||z_h(t) W_O[h]|| (z_h: the head's slice of the output projection's input; W_O[h]: the
projection's rows for that slice). Grouped-query attention needs nothing special: z is per query head.

The norm is computed as sqrt(z_h G_h z_h) with G_h = W_O[h] W_O[h]^T, [head_dim, head_dim]: a ninth of the work
of forming each head's [d_model] write, and no [tokens, heads, d_model] tensor. Heads have no logit effects (what
a head writes depends on what it attends to, not on one fixed direction).
"""

from __future__ import annotations

import torch

from featureatlas.errors import UsageError
from featureatlas.harvest.hooks import resolve_hook
from featureatlas.harvest.sources import UnitSource
from featureatlas.load.architectures import get_submodule, input_to_output_matrix


def n_query_heads(config: object) -> int:
    for name in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UsageError(f"{getattr(config, 'model_type', 'this model')}: its config names no number of attention heads")


def head_write_norms(z: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """z [..., heads * head_dim], gram [heads, head_dim, head_dim] -> [..., heads], in float32 then z's dtype."""
    heads, head_dim = gram.shape[0], gram.shape[1]
    zh = z.float().reshape(*z.shape[:-1], heads, head_dim)
    squared = torch.einsum("...hd,hde,...he->...h", zh, gram, zh)
    return squared.clamp_min(0).sqrt().to(z.dtype)


def head_sources(model: torch.nn.Module, layers: list[int]) -> list[UnitSource]:
    """Source `attn` for each layer: its query heads, read at the attention output projection's input."""
    backbone, config = model.base_model, model.config
    heads = n_query_heads(config)
    sources = []
    for layer in layers:
        hook = resolve_hook(f"blocks.{layer}.attn.hook_z", backbone, config.model_type)
        w_o = input_to_output_matrix(get_submodule(backbone, hook.module)).float()  # [heads * head_dim, d_model]
        if w_o.shape[0] % heads:
            raise UsageError(f"{hook.module}: {w_o.shape[0]} inputs do not split into {heads} heads")
        per_head = w_o.reshape(heads, w_o.shape[0] // heads, w_o.shape[1])
        gram = per_head @ per_head.transpose(1, 2)

        def encode(z: torch.Tensor, gram: torch.Tensor = gram) -> torch.Tensor:
            return head_write_norms(z, gram)
        sources.append(UnitSource("attn", "attn", hook, heads, signed=False, sparse=False, encode=encode))
    return sources
