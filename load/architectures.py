"""Where each supported architecture keeps the modules the harvest reads: one entry per model family.

Paths are attribute paths: `blocks` and `final_norm` from the model's backbone (`model.base_model`), the rest
from one transformer block. A neuron's activation is the input of the MLP's output projection (after the
nonlinearity, and after the gate in gated MLPs). `hooks.py` maps TransformerLens hook names onto these paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featureatlas.errors import UnsupportedModelError


@dataclass(frozen=True)
class Architecture:
    blocks: str               # the list of transformer blocks
    final_norm: str           # the norm before the unembedding
    mlp_out_proj: str         # the MLP's output projection: its input is the neurons
    mlp: str                  # output: what the MLP adds to the residual stream (TransformerLens hook_mlp_out)
    mlp_in: str               # input: the MLP's (normalised) input
    attn: str                 # output: what attention adds to the residual stream (hook_attn_out)
    attn_out_proj: str        # attention's output projection: its input is the heads' z, flattened
    ln2: str | None           # the pre-MLP norm: its input is hook_resid_mid; None for parallel attention + MLP
    gated: bool               # neurons are act(gate(x)) * up(x): signed, so bottom examples matter
    post_mlp_norm: str | None = None  # Gemma 2/3 normalise the MLP's output before adding it


def _llama_like(gated: bool = True) -> Architecture:
    return Architecture(blocks="layers", final_norm="norm", mlp_out_proj="mlp.down_proj", mlp="mlp", mlp_in="mlp",
                        attn="self_attn", attn_out_proj="self_attn.o_proj", ln2="post_attention_layernorm",
                        gated=gated)


_GEMMA2 = Architecture(blocks="layers", final_norm="norm", mlp_out_proj="mlp.down_proj",
                       mlp="post_feedforward_layernorm", mlp_in="mlp", attn="post_attention_layernorm",
                       attn_out_proj="self_attn.o_proj", ln2="pre_feedforward_layernorm", gated=True,
                       post_mlp_norm="post_feedforward_layernorm")

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(blocks="h", final_norm="ln_f", mlp_out_proj="mlp.c_proj", mlp="mlp", mlp_in="mlp",
                         attn="attn", attn_out_proj="attn.c_proj", ln2="ln_2", gated=False),
    "gpt_neox": Architecture(blocks="layers", final_norm="final_layer_norm", mlp_out_proj="mlp.dense_4h_to_h",
                             mlp="mlp", mlp_in="mlp", attn="attention", attn_out_proj="attention.dense",
                             ln2="post_attention_layernorm", gated=False),
    "gptj": Architecture(blocks="h", final_norm="ln_f", mlp_out_proj="mlp.fc_out", mlp="mlp", mlp_in="mlp",
                         attn="attn", attn_out_proj="attn.out_proj", ln2=None, gated=False),
    "opt": Architecture(blocks="decoder.layers", final_norm="decoder.final_layer_norm", mlp_out_proj="fc2",
                        mlp="fc2", mlp_in="fc1", attn="self_attn", attn_out_proj="self_attn.out_proj",
                        ln2="final_layer_norm", gated=False),
    "phi": Architecture(blocks="layers", final_norm="final_layernorm", mlp_out_proj="mlp.fc2", mlp="mlp",
                        mlp_in="mlp", attn="self_attn", attn_out_proj="self_attn.dense", ln2=None, gated=False),
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(),
    "gemma": _llama_like(),
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "phi3": _llama_like(),
    "smollm3": _llama_like(),
    "olmo": _llama_like(),
    "olmo2": Architecture(blocks="layers", final_norm="norm", mlp_out_proj="mlp.down_proj",
                          mlp="post_feedforward_layernorm", mlp_in="mlp", attn="post_attention_layernorm",
                          attn_out_proj="self_attn.o_proj", ln2=None, gated=True,
                          post_mlp_norm="post_feedforward_layernorm"),
    "granite": _llama_like(),
}



def architecture_of(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported yet; supported: {', '.join(sorted(ARCHITECTURES))} "
            "(adding one is a single entry in harvest/architectures.py)") from None


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
    return get_submodule(block, architecture_of(model_type).mlp_out_proj)


def neurons_of(proj: torch.nn.Module) -> int:
    """Width of the projection's input: nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]."""
    if isinstance(proj, torch.nn.Linear):
        return proj.in_features
    return proj.weight.shape[0]


def input_to_output_matrix(proj: torch.nn.Module) -> torch.Tensor:
    """[in, out]: row i is what input dimension i adds to the output (nn.Linear and GPT-2's Conv1D alike)."""
    weight = proj.weight.detach()
    return weight.T if isinstance(proj, torch.nn.Linear) else weight
