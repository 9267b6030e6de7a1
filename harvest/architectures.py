"""Where each supported architecture keeps its transformer blocks and its MLP output projection.

A neuron's activation is the input of the MLP's output projection (after the nonlinearity, and after the gate
in gated MLPs), so one entry per architecture is all a new model family needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Architecture:
    blocks: str       # attribute path, from the model's backbone, of the list of transformer blocks
    mlp_out: str      # attribute path, from a block, of the MLP's output projection


_LLAMA_LIKE = Architecture(blocks="layers", mlp_out="mlp.down_proj")

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(blocks="h", mlp_out="mlp.c_proj"),
    "gpt_neox": Architecture(blocks="layers", mlp_out="mlp.dense_4h_to_h"),
    "gptj": Architecture(blocks="h", mlp_out="mlp.fc_out"),
    "opt": Architecture(blocks="decoder.layers", mlp_out="fc2"),
    "phi": Architecture(blocks="layers", mlp_out="mlp.fc2"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": Architecture(blocks="layers", mlp_out="mlp.down_proj"),
    "smollm3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
}


class UnsupportedModelError(Exception):
    pass


def architecture_of(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported yet; supported: {', '.join(sorted(ARCHITECTURES))} "
            "(adding one is a single line in harvest/architectures.py)") from None


def get_submodule(root: torch.nn.Module, path: str) -> torch.nn.Module:
    module = root
    for name in path.split("."):
        if not hasattr(module, name):
            raise UnsupportedModelError(
                f"{type(root).__name__} has no module {path!r} where its architecture's entry in "
                "harvest/architectures.py expects one (a mixture-of-experts MLP, or a changed transformers "
                "class?); fix that entry")
        module = getattr(module, name)
    return module


def blocks_of(backbone: torch.nn.Module, model_type: str) -> torch.nn.ModuleList:
    return get_submodule(backbone, architecture_of(model_type).blocks)


def mlp_out_of(block: torch.nn.Module, model_type: str) -> torch.nn.Module:
    return get_submodule(block, architecture_of(model_type).mlp_out)


def neurons_of(proj: torch.nn.Module) -> int:
    """Width of the projection's input: nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]."""
    if isinstance(proj, torch.nn.Linear):
        return proj.in_features
    return proj.weight.shape[0]
