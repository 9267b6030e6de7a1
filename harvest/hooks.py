"""Hook names → the transformers module and tensor they read, for every family in the architecture table.

Two vocabularies are understood: TransformerLens's hook names as SAELens writes them (`blocks.6.hook_resid_post`,
`blocks.6.mlp.hook_post`, `blocks.6.ln2.hook_normalized`, …) and plain module paths under the backbone as
EleutherAI's sparsify writes them (`layers.6`, `layers.6.mlp`), read at the module's output or input.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from featureatlas.errors import UsageError
from featureatlas.load.architectures import Architecture, UnsupportedModelError, architecture_of, get_submodule

_TL_NAME = re.compile(r"blocks\.(\d+)\.(.+)")

# TransformerLens hook -> (field of the architecture entry, or "" for the block itself; what is read; space)
# space says what the tensor's dimensions are, which decides how a direction in it reaches the logits.
_TL_HOOKS: dict[str, tuple[str, str, str]] = {
    "hook_resid_pre": ("", "input", "residual"),
    "hook_resid_mid": ("ln2", "input", "residual"),
    "hook_resid_post": ("", "output", "residual"),
    "hook_mlp_in": ("ln2", "input", "residual"),  # TransformerLens: resid_mid, before the pre-MLP norm
    "hook_attn_out": ("attn", "output", "residual"),
    "hook_mlp_out": ("mlp", "output", "residual"),
    "mlp.hook_post": ("mlp_out_proj", "input", "neurons"),
    "ln2.hook_normalized": ("ln2", "normalized", "residual"),
    "attn.hook_z": ("attn_out_proj", "input", "heads"),
}


@dataclass(frozen=True)
class Hook:
    name: str      # as the user or dictionary wrote it
    layer: int
    module: str    # attribute path from the backbone
    reads: str     # 'input' | 'output' | 'normalized' (the module's input, normalised as the norm does, unscaled)
    space: str     # 'residual' | 'neurons' | 'heads' | 'other'

    @property
    def description(self) -> str:
        return f"{self.module}:{self.reads}"


def resolve_hook(name: str, backbone: torch.nn.Module, model_type: str, reads: str = "hook") -> Hook:
    """reads='hook' for a TransformerLens name; 'output' or 'input' for a module path (sparsify's)."""
    arch = architecture_of(model_type)
    n_layers = len(get_submodule(backbone, arch.blocks))
    if reads == "hook":
        return _resolve_transformer_lens(name, arch, backbone, n_layers)
    prefix = arch.blocks + "."
    while not name.startswith(prefix) and "." in name:  # a path from the causal-LM model: `model.layers.6`
        name = name.split(".", 1)[1]
    match = re.match(re.escape(prefix) + r"(\d+)(\.|$)", name)
    if not match or int(match.group(1)) >= n_layers:
        raise UsageError(f"hook {name!r}: not a module inside one of the {n_layers} blocks "
                         f"({prefix}0 … {prefix}{n_layers - 1}) of this {model_type} model")
    try:
        get_submodule(backbone, name)
    except UnsupportedModelError:
        raise UsageError(f"hook {name!r}: this {model_type} model has no such module") from None
    layer = int(match.group(1))
    writes_residual = name == f"{prefix}{layer}" or (reads == "output" and name == f"{prefix}{layer}.{arch.mlp}")
    return Hook(name, layer, name, reads, "residual" if writes_residual else "other")


def _resolve_transformer_lens(name: str, arch: Architecture, backbone: torch.nn.Module, n_layers: int) -> Hook:
    match = _TL_NAME.fullmatch(name)
    point = _TL_HOOKS.get(match.group(2)) if match else None
    if point is None:
        raise UsageError(f"hook {name!r}: not a hook featureatlas reads; use blocks.L. followed by one of "
                         f"{', '.join(_TL_HOOKS)}")
    layer = int(match.group(1))
    if layer >= n_layers:
        raise UsageError(f"hook {name!r}: layer {layer} is out of range; this model has layers 0-{n_layers - 1}")
    field, reads, space = point
    path = getattr(arch, field) if field else ""
    if field == "ln2" and (path is None or getattr(backbone.config, "use_parallel_residual", False)):
        raise UsageError(f"hook {name!r}: this model runs attention and MLP in parallel, so it has no "
                         "residual stream between them; use hook_resid_pre or hook_resid_post")
    module = f"{arch.blocks}.{layer}" + (f".{path}" if path else "")
    get_submodule(backbone, module)  # a wrong table entry fails here, with a message that says so
    return Hook(name, layer, module, reads, space)


def read_hook(backbone: torch.nn.Module, hook: Hook, callback: Callable[[torch.Tensor], None]
              ) -> torch.utils.hooks.RemovableHandle:
    """Call callback with the hook's tensor at every forward pass; returns the handle that removes it.
    Outputs may be tuples (their first element is the hidden state); inputs may come as a keyword."""
    module = get_submodule(backbone, hook.module)
    if hook.reads == "output":
        def read_output(m: torch.nn.Module, args: tuple, out: object) -> None:  # None: the output stays as is
            callback(out[0] if isinstance(out, tuple) else out)
        return module.register_forward_hook(read_output)
    norm = module if hook.reads == "normalized" else None

    def read_input(m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        callback(normalized(norm, x) if norm is not None else x)
    return module.register_forward_pre_hook(read_input, with_kwargs=True)


def normalized(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the norm makes of x before its own weight and bias: TransformerLens's `ln2.hook_normalized`."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-5)
    h = x.float()
    if isinstance(norm, torch.nn.LayerNorm):
        h = h - h.mean(-1, keepdim=True)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def norm_gain(norm: torch.nn.Module, width: int) -> torch.Tensor:
    """The norm's per-dimension gain, read off the module itself (so Gemma's 1 + weight needs no special case):
    a zero-mean, unit-variance input s gives (norm(s) - norm(-s)) / 2s, for LayerNorm and RMSNorm alike."""
    norm = copy.deepcopy(norm).float()
    device = next(norm.parameters()).device
    if width % 2:  # no alternating ±1 vector has mean zero: take the weight as it is
        return norm.weight.detach().float()
    s = torch.ones(width, dtype=torch.float32, device=device)
    s[1::2] = -1
    with torch.no_grad():
        out = norm(torch.stack([s, -s]))
    return (out[0] - out[1]) / (2 * s)
