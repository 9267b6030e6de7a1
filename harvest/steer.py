"""Steering: push on one unit and see what the model writes, beside what it writes unpushed.

`add` adds strength x the unit's direction where the unit writes, at every position (the prompt's and each new
token's): a neuron's row of the MLP output projection to the projection's output, a residual dimension's basis
vector to the block's output, a dictionary feature's decoder row to the tensor its dictionary hooks (a
transcoder's to the tensor its decoder writes). `clamp` sets a dictionary feature's activation to a value:
encode, edit, decode, keeping the reconstruction error, which for the linear decoders here is adding
(value - activation) x the decoder row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from featureatlas.errors import UsageError
from featureatlas.harvest.hooks import Hook, read_hook
from featureatlas.harvest.sources import UnitSource
from featureatlas.load.architectures import architecture_of, get_submodule, input_to_output_matrix

if TYPE_CHECKING:  # for type hints only: importing them takes seconds
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MODES = ("add", "clamp")
MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class Steered:
    """A prompt's continuation with and without the push (the same decoding, the same seed)."""

    prompt: str
    unsteered: str
    steered: str
    mode: str
    value: float


def direction(model: PreTrainedModel, source: UnitSource, unit: int) -> tuple[Hook, torch.Tensor]:
    """Where the unit writes and what one unit of it writes there: (hook, [width] vector)."""
    if not 0 <= unit < source.n_units:
        raise UsageError(f"unit {unit}: {source.name} layer {source.layer} has units 0-{source.n_units - 1}")
    backbone = model.base_model
    if source.kind == "resid":
        vector = torch.zeros(source.n_units, device=model.device)
        vector[unit] = 1.0
        return source.hook, vector
    if source.kind == "mlp":
        arch = architecture_of(model.config.model_type)
        module = f"{arch.blocks}.{source.layer}.{arch.mlp_out_proj}"
        row = input_to_output_matrix(get_submodule(backbone, module))[unit]
        return Hook(f"{source.hook.name} (output)", source.layer, module, "output", "residual"), row
    if source.dictionary is None:
        raise UsageError(f"{source.name}: its units have no single direction to push along; steer a neuron, a "
                         "residual dimension or a dictionary feature")
    hook = source.output_hook or source.hook
    if hook.reads == "normalized":
        raise UsageError(f"{source.name}: its decoder writes to {hook.name}, a value no module passes on; "
                         "steer a dictionary on another hook")
    return hook, source.dictionary.decoder[unit]


@contextlib.contextmanager
def steering(model: PreTrainedModel, source: UnitSource, unit: int, value: float, mode: str = "add"
             ) -> Iterator[None]:
    """While active, every forward pass of `model` is pushed on the unit (see the module docstring)."""
    if mode not in MODES:
        raise UsageError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    hook, vector = direction(model, source, unit)
    handles = []
    if mode == "add":
        handles.append(_edit(model, hook, lambda x: x + value * vector.to(x.dtype)))
    else:
        dictionary = source.dictionary
        if dictionary is None:
            raise UsageError(f"clamp: {source.name} units have no encoder to edit; add a strength instead")
        if dictionary.normalize != "none" or dictionary.rescale_acts_by_decoder_norm:
            raise UsageError(f"{dictionary.path}: clamp needs a decoder that adds activation x row; this dictionary "
                             "normalises its input or rescales its activations: steer by strength instead")
        activation: dict[str, torch.Tensor] = {}  # the unit's, at every position of the current forward pass

        def remember(x: torch.Tensor) -> None:
            activation["now"] = dictionary.encode(x)[..., unit]
        handles.append(read_hook(model.base_model, source.hook, remember))
        handles.append(_edit(model, hook, lambda x: x + ((value - activation["now"]).unsqueeze(-1)
                                                         * vector).to(x.dtype)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _edit(model: PreTrainedModel, hook: Hook, change: Callable[[torch.Tensor], torch.Tensor]
          ) -> torch.utils.hooks.RemovableHandle:
    """Replace the hooked tensor by change(tensor) in every forward pass."""
    module = get_submodule(model.base_model, hook.module)
    if hook.reads == "output":
        def edit_output(m: torch.nn.Module, args: tuple, out: object) -> object:
            if isinstance(out, tuple):
                return (change(out[0]), *out[1:])
            return change(out)
        return module.register_forward_hook(edit_output)
    if hook.reads != "input":
        raise UsageError(f"hook {hook.name}: steering edits a module's input or output, not {hook.reads}")

    def edit_input(m: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            return (change(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": change(kwargs["hidden_states"])}
    return module.register_forward_pre_hook(edit_input, with_kwargs=True)


def continue_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, token_ids: list[int],
                  max_new_tokens: int, seed: int | None) -> str:
    """Greedy continuation (seed None) or sampled with that seed; the new tokens as text."""
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UsageError(f"max_new_tokens: from 1 to {MAX_NEW_TOKENS}")
    ids = torch.tensor([token_ids], device=model.device)
    options: dict = {"do_sample": False}
    if seed is not None:
        torch.manual_seed(seed)
        options = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, **options)
    return tokenizer.decode(out[0, len(token_ids):], skip_special_tokens=True)


def steer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: UnitSource, unit: int,
          token_ids: list[int], prompt: str, value: float, mode: str = "add", max_new_tokens: int = 30,
          seed: int | None = None) -> Steered:
    """The continuation of token_ids unsteered, then steered, with the same decoding."""
    plain = continue_text(model, tokenizer, token_ids, max_new_tokens, seed)
    with steering(model, source, unit, value, mode):
        pushed = continue_text(model, tokenizer, token_ids, max_new_tokens, seed)
    return Steered(prompt, plain, pushed, mode, value)
