"""Ablation effects: what a unit's contribution at one position does to the tokens that follow it.

For a context and a position p (a top example's max token), the change in log p(token t + 1 | tokens 0..t), for
every t >= p, when the unit's contribution is removed at p only:
- a neuron: its activation zeroed at p (the input of the MLP output projection), which subtracts activation x its
  row of the projection from the MLP's output;
- a residual dimension: that dimension of the block's output zeroed at p;
- a dictionary feature: activation x its decoder row subtracted at p from the tensor its decoder writes (the
  hooked tensor; a transcoder's output hook), so the dictionary's reconstruction error stays;
- an attention head (source attn): its slice of z, the attention output projection's input, zeroed at p.
Nothing before p changes, so neither do the tokens up to p. Contexts of one length run together, one clean and
one ablated forward pass a batch (no padding); a context's clean pass is shared by every row that ablates it.
`harvest --ablation-effects` stores them for every unit's top examples (the `ablations` view); `serve` computes
them on demand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import tqdm

from featureatlas.errors import UsageError
from featureatlas.harvest.hooks import Hook, read_hook
from featureatlas.harvest.sources import UnitSource
from featureatlas.load.architectures import get_submodule

if TYPE_CHECKING:  # for type hints only: importing them takes seconds
    from transformers import PreTrainedModel

if TYPE_CHECKING:
    from featureatlas.store.writer import StoreWriter


@dataclass(frozen=True)
class Ablated:
    """A context's following tokens with and without the unit at `position`: effects[i] is the change in
    log p(token_ids[position + 1 + i]), ablated minus as run."""

    token_ids: list[int]
    position: int
    effects: np.ndarray  # float32 [len(token_ids) - position - 1]


Row = tuple[int, Sequence[int], int]  # (unit, token ids of the whole context, position to ablate)
MAX_LOGITS = 1 << 25  # float32 logits a batch may hold (128 MiB): a large vocabulary makes batches smaller


def ablation_effects(model: PreTrainedModel, source: UnitSource, rows: Sequence[Row], batch_size: int = 8,
                     on_batch: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Each row's effects (see Ablated), float32, in the rows' order; on_batch(rows done) after each batch."""
    rows = [(int(unit), [int(t) for t in ids], int(position)) for unit, ids, position in rows]
    for unit, ids, position in rows:
        if not 0 <= unit < source.n_units:
            raise UsageError(f"unit {unit}: {source.name} layer {source.layer} has units 0-{source.n_units - 1}")
        if not 0 <= position < len(ids):
            raise UsageError(f"position {position}: the context has positions 0-{len(ids) - 1}")
    _edit_hook(source)  # refuses what cannot be ablated before any forward pass
    vocabulary = model.get_output_embeddings().weight.shape[0]
    clean: dict[tuple[int, ...], np.ndarray] = {}
    for group in _same_length([tuple(ids) for ids in dict.fromkeys(tuple(ids) for _, ids, _ in rows)], batch_size,
                              vocabulary):
        clean.update(zip(group, _following_log_probs(model, group), strict=True))
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(rows)
    for chunk in _same_length(list(range(len(rows))), batch_size, vocabulary, key=lambda i: len(rows[i][1])):
        units = torch.tensor([rows[i][0] for i in chunk], device=model.device)
        positions = torch.tensor([rows[i][2] for i in chunk], device=model.device)
        with ablating(model, source, units, positions):
            ablated = _following_log_probs(model, [rows[i][1] for i in chunk])
        for i, log_probs in zip(chunk, ablated, strict=True):
            _, ids, position = rows[i]
            out[i] = (log_probs[position:] - clean[tuple(ids)][position:]).astype(np.float32)
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def ablate(model: PreTrainedModel, source: UnitSource, unit: int, token_ids: Sequence[int], position: int
           ) -> Ablated:
    """One context's effects of removing `unit` at `position`."""
    (effects,) = ablation_effects(model, source, [(unit, token_ids, position)])
    return Ablated(list(token_ids), int(position), effects)


def _same_length(items: list, batch_size: int, vocabulary: int, key: Callable[[object], int] = len
                 ) -> Iterator[list]:
    """Items in batches whose keys (lengths) are equal: at most batch_size, and at most MAX_LOGITS logits."""
    by_length: dict[int, list] = {}
    for item in items:
        by_length.setdefault(key(item), []).append(item)
    for length, group in by_length.items():
        size = max(1, min(batch_size, MAX_LOGITS // max(1, length * vocabulary)))
        for start in range(0, len(group), size):
            yield group[start:start + size]


def _following_log_probs(model: PreTrainedModel, contexts: Sequence[Sequence[int]]) -> np.ndarray:
    """float32 [contexts, length - 1]: log p(token t + 1 | tokens 0..t) of contexts of one length."""
    ids = torch.tensor([list(c) for c in contexts], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        chosen = logits.gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (chosen - logits.logsumexp(-1)).cpu().numpy()


def _edit_hook(source: UnitSource) -> Hook:
    """Where the unit's contribution is removed; a UsageError for a source where that is not one tensor edit."""
    if source.dictionary is None:
        return source.hook
    dictionary = source.dictionary
    if dictionary.normalize != "none":
        raise UsageError(f"{dictionary.path}: this dictionary normalises its input, so a feature's contribution is "
                         "not activation x its decoder row; ablation effects need a dictionary that does not")
    hook = source.output_hook or source.hook
    if hook.reads not in ("input", "output"):
        raise UsageError(f"{source.name}: its decoder writes to {hook.name}, a value no module passes on; ablation "
                         "effects need a dictionary on another hook")
    return hook


@contextlib.contextmanager
def ablating(model: PreTrainedModel, source: UnitSource, units: torch.Tensor, positions: torch.Tensor
             ) -> Iterator[None]:
    """While active, every forward pass of a batch of len(units) rows removes unit units[b] of row b at
    positions[b] (see the module docstring); positions elsewhere are untouched."""
    rows = torch.arange(len(units), device=units.device)
    handles = []
    if source.dictionary is not None:
        dictionary = source.dictionary
        decoder = dictionary.decoder
        coefficient: dict[str, torch.Tensor] = {}

        def remember(x: torch.Tensor) -> None:  # the units' activations at their positions, before any edit
            at = x.reshape(len(rows), -1, x.shape[-1])[rows, positions]
            acts = dictionary.encode(at)[rows, units].float()
            if dictionary.rescale_acts_by_decoder_norm:  # its decode divides by the row's norm first
                acts = acts / decoder[units].float().norm(dim=-1)
            coefficient["now"] = acts

        def remove(x: torch.Tensor) -> None:
            x[rows, positions] -= (coefficient["now"][:, None] * decoder[units].float()).to(x.dtype)
        handles.append(read_hook(model.base_model, source.hook, remember))
        handles.append(_edit(model, _edit_hook(source), len(rows), remove))
    elif source.kind == "attn":
        def remove(x: torch.Tensor) -> None:
            heads = x.reshape(*x.shape[:2], source.n_units, -1)
            heads[rows, positions, units] = 0
        handles.append(_edit(model, source.hook, len(rows), remove))
    elif source.kind in ("mlp", "resid"):
        def remove(x: torch.Tensor) -> None:
            x[rows, positions, units] = 0
        handles.append(_edit(model, source.hook, len(rows), remove))
    else:
        raise UsageError(f"{source.name}: featureatlas cannot ablate units of kind {source.kind}")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _edit(model: PreTrainedModel, hook: Hook, batch: int, remove: Callable[[torch.Tensor], None]
          ) -> torch.utils.hooks.RemovableHandle:
    """Apply remove(x) in place to a copy of the hooked tensor, seen as [batch, tokens, width] (OPT flattens batch
    and tokens inside the MLP), in every forward pass."""
    def changed(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        remove(y.view(batch, -1, y.shape[-1]))
        return y
    module = get_submodule(model.base_model, hook.module)
    if hook.reads == "output":
        def edit_output(m: torch.nn.Module, args: tuple, out: object) -> object:
            return (changed(out[0]), *out[1:]) if isinstance(out, tuple) else changed(out)
        return module.register_forward_hook(edit_output)
    if hook.reads != "input":
        raise UsageError(f"hook {hook.name}: ablation edits a module's input or output, not {hook.reads}")

    def edit_input(m: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (changed(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": changed(kwargs["hidden_states"])}
    return module.register_forward_pre_hook(edit_input, with_kwargs=True)


def write_ablations(store: StoreWriter, model_name: str, model: PreTrainedModel, sources: list[UnitSource],
                    contexts: dict[int, Sequence[int]], batch_size: int, progress: bool = False) -> int:
    """Every top example's effects (its unit removed at its max token) into t_ablations, a source at a time: the
    post-pass of `harvest --ablation-effects`, run once the examples are written. Returns the rows written."""
    found = store.con.execute("SELECT source, layer, unit, context_id, max_position FROM t_examples "
                              "WHERE model = ? AND example_kind = 'top' ORDER BY source, layer, unit, rank",
                              [model_name]).fetchall()
    by_source: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    for source, layer, unit, context_id, position in found:
        if context_id in contexts:
            by_source.setdefault((source, layer), []).append((unit, context_id, position))
    written = 0
    with tqdm.tqdm(total=sum(len(r) for r in by_source.values()), unit="example", desc="ablations",
                   disable=not progress, dynamic_ncols=True) as bar:
        for source in sources:
            picked = by_source.get((source.name, source.layer), [])
            if not picked:
                continue
            effects = ablation_effects(model, source, [(u, contexts[c], p) for u, c, p in picked], batch_size,
                                       bar.update)
            store.add_ablations(model_name, source.name, source.layer, np.array([u for u, _, _ in picked]),
                                np.array([c for _, c, _ in picked]), np.array([p for _, _, p in picked]), effects)
            written += len(picked)
    return written
