"""Where an attention head looked, and what a dictionary on attention's hook_z read from each earlier position: a
post-pass over the contexts of the examples just stored (harvest/run.py runs it once the store's rows are written).

Head h of layer L writes z_h(t) W_O[h] at token t, with z_h(t) = sum_s a_h(t, s) v_h(s) (a_h: its attention
weights; v_h: the value vectors of its key-value head, shared by the query heads of a group). At an example's max
token t each position s gets
    weights[s] = a_h(t, s)                      the model's own (eager) attention weights
    shares[s]  = a_h(t, s) ||v_h(s) W_O[h]||    its share of the write, by norm
The writes a_h(t, s) v_h(s) W_O[h] add up to the head's write at t, whose norm is the head's activation.

A dictionary on blocks.L.attn.hook_z reads z(t) = concat_h z_h(t), which splits the same way into the parts
p_s = concat_h a_h(t, s) v_h(s). Its feature f's pre-activation at t is linear in z(t) once the input
normalisation's per-token scale is taken at t (constant_norm_rescale: sqrt(d_in) / ||z(t)||; layer_norm: centred,
then divided by std(z(t)) + 1e-5; none: 1), so it splits exactly into
    shares[s] = N_t(p_s) . W[:, f]              the direct feature attribution of position s
    constant  = -b_dec . W[:, f] + b[f]         (-b_dec only for dictionaries that subtract it from their input)
with sum_s shares[s] + constant = the pre-activation at t: the feature's activation wherever it fires. W and b are
the encoder's: SAELens W_enc and b_enc (times the decoder row's norm for a top-k SAE that rescales by it), a gated
SAE's magnitude path W_enc exp(r_mag) and b_mag (its gate only decides whether the feature is on), sparsify's
encoder. Every supported encoder is linear up to that scale; one that is not is skipped with a line on stderr.

Cost: one forward pass per batch of the examples' distinct contexts, up to the deepest layer needed, in eager
attention (which materialises each layer's [batch, heads, tokens, tokens] weights; batches shrink to keep those
under ATTENTION_BYTES). The model is switched to eager attention for this pass only and switched back after it,
so the harvest's own forward passes, and a harvest without heads or hook_z dictionaries, run as before. Heads get
attributions for every kind of example; dictionaries, whose features are many, for their top examples. A layer
whose value vectors do not rebuild its z (a family that keeps them elsewhere) is skipped with a line on stderr.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import torch
import tqdm

from featureatlas.errors import FeatureAtlasError
from featureatlas.harvest.contexts import Context, make_batch
from featureatlas.harvest.heads import n_query_heads
from featureatlas.harvest.hooks import Hook, read_hook, resolve_hook
from featureatlas.harvest.sources import UnitSource
from featureatlas.load.architectures import blocks_of, get_submodule, input_to_output_matrix

if TYPE_CHECKING:  # for type hints only: importing them takes seconds
    from transformers import PreTrainedModel

if TYPE_CHECKING:
    from featureatlas.load.dictionaries import Dictionary
    from featureatlas.store.writer import StoreWriter

ATTENTION_BYTES = 1 << 30  # a batch's attention weights of one layer, with the softmax's float32 copies
KINDS = {"head": None, "dictionary": ("top",)}  # the example kinds each gets attributions for (None: all)
_LN_EPS = 1e-5  # SAELens's layer_norm input normalisation: (x - mean) / (std + 1e-5)
_WORK_FLOATS = 1 << 24  # per chunk of a dictionary's rows: [rows, tokens, heads] float32 products


@dataclass(frozen=True)
class Row:
    """One example to attribute: source `sources[source]`'s unit at `position` of context `context_id`."""

    source: int
    unit: int
    context_id: int
    position: int


@dataclass(frozen=True)
class Attribution:
    """What each position 0..position contributed at the example's max token (see the module docstring)."""

    shares: np.ndarray              # float32 [position + 1]
    weights: np.ndarray | None      # float32 [position + 1]: a head's attention weights; None for dictionaries
    constant: float | None          # a dictionary's constant term; None for heads


def attribution_kind(model: PreTrainedModel, source: UnitSource) -> str | None:
    """'head' for attention heads, 'dictionary' for a dictionary reading blocks.L.attn.hook_z (the attention
    output projection's input), None for any other source."""
    if source.kind == "attn":
        return "head"
    if source.dictionary is None or source.hook.reads != "input":
        return None
    try:
        z = resolve_hook(f"blocks.{source.layer}.attn.hook_z", model.base_model, model.config.model_type)
    except FeatureAtlasError:  # a family without the hook has no such dictionaries
        return None
    return "dictionary" if source.hook.module == z.module else None


def write_attributions(store: StoreWriter, model_name: str, model: PreTrainedModel, sources: list[UnitSource],
                       batch_size: int, progress: bool = False) -> int:
    """Attributions of the stored examples of every head and hook_z dictionary among sources, added to the store
    (the `attributions` view); returns the rows written. No forward pass at all when there are none."""
    kinds = {i: kind for i, s in enumerate(sources) if (kind := attribution_kind(model, s)) is not None}
    if not kinds:
        return 0
    rows = _stored_rows(store.con, model_name, sources, kinds)
    token_ids = _stored_contexts(store.con, {row.context_id for row in rows})
    results = attribute(model, sources, rows, token_ids, batch_size, progress)
    by_source: dict[int, list[tuple[Row, Attribution]]] = defaultdict(list)
    for row, result in zip(rows, results, strict=True):
        if result is not None:
            by_source[row.source].append((row, result))
    for index, pairs in by_source.items():
        source, head = sources[index], kinds[index] == "head"
        store.add_attributions(
            model_name, source.name, source.layer, kinds[index], np.array([r.unit for r, _ in pairs]),
            np.array([r.context_id for r, _ in pairs]), np.array([r.position for r, _ in pairs]),
            [a.shares for _, a in pairs], [a.weights for _, a in pairs] if head else None,
            None if head else np.array([a.constant for _, a in pairs], np.float32))
    return sum(len(pairs) for pairs in by_source.values())


def _stored_rows(con: duckdb.DuckDBPyConnection, model_name: str, sources: list[UnitSource],
                 kinds: dict[int, str]) -> list[Row]:
    rows = []
    for index, kind in kinds.items():
        source, wanted = sources[index], KINDS[kind]
        where = "" if wanted is None else f" AND example_kind IN ({', '.join(repr(k) for k in wanted)})"
        found = con.execute(f"""SELECT DISTINCT unit, context_id, max_position FROM examples
                                WHERE model = ? AND source = ? AND layer = ?{where} ORDER BY ALL""",
                            [model_name, source.name, source.layer]).fetchall()
        rows += [Row(index, int(u), int(c), int(p)) for u, c, p in found]
    return rows


def _stored_contexts(con: duckdb.DuckDBPyConnection, ids: set[int]) -> dict[int, list[int]]:
    if not ids:
        return {}
    found = con.execute("SELECT context_id, token_ids FROM contexts WHERE context_id IN (SELECT unnest(?))",
                        [sorted(ids)]).fetchall()
    return {int(c): list(t) for c, t in found}


def attribute(model: PreTrainedModel, sources: list[UnitSource], rows: list[Row], token_ids: dict[int, list[int]],
              batch_size: int = 32, progress: bool = False) -> list[Attribution | None]:
    """Each row's attribution, in the rows' order; None for a row whose layer could not be attributed (a line on
    stderr says why) or whose context is missing. Runs the contexts in eager attention, then restores the
    model's own attention implementation."""
    layers = _layer_plans(model, sources, rows)
    out: list[Attribution | None] = [None] * len(rows)
    if not layers:
        return out
    by_context: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        plan = layers.get(sources[row.source].layer)
        if row.context_id in token_ids and plan is not None and row.source in plan.sources:
            by_context[row.context_id].append(i)
    contexts = sorted(by_context, key=lambda c: (-len(token_ids[c]), c))
    heads = n_query_heads(model.config)
    with eager_attention(model) as eager, tqdm.tqdm(total=len(contexts), unit="ctx", desc="attention",
                                                     disable=not progress, dynamic_ncols=True) as bar:
        if not eager:
            _note("this model cannot switch to eager attention (transformers too old?); no attributions written")
            return out
        done = 0
        while done < len(contexts):
            longest = len(token_ids[contexts[done]])
            size = max(1, min(batch_size, ATTENTION_BYTES // (12 * heads * longest * longest)))
            batch = contexts[done:done + size]
            try:
                _run_batch(model, layers, sources, rows, [(c, token_ids[c], by_context[c]) for c in batch], out)
            except _NoWeights as err:
                _note(f"{err}; no attributions written")
                return [None] * len(rows)
            done += len(batch)
            bar.update(len(batch))
    return out


@contextlib.contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[bool]:
    """The model in eager attention (whose attention modules return their weights) inside the block, its own
    implementation again after it; yields False when this transformers cannot switch (nothing is changed)."""
    before = model.config._attn_implementation
    if before == "eager":
        yield True
        return
    switch = getattr(model, "set_attn_implementation", None)
    if switch is None:
        yield False
        return
    switch("eager")
    try:
        yield model.config._attn_implementation == "eager"
    finally:
        switch(before)


# ---- per layer: where its weights, values and z are read, and what its sources need ----

@dataclass
class _SourcePlan:
    kind: str                                # 'head' | 'dictionary'
    gram: torch.Tensor | None = None         # heads: [heads, head_dim, head_dim], W_O[h] W_O[h]^T
    w: torch.Tensor | None = None            # dictionaries: [d_in, d_sae] float32 encoder
    constant: torch.Tensor | None = None     # dictionaries: [d_sae]
    w_sum: torch.Tensor | None = None        # dictionaries: [d_sae], the columns' sums (layer_norm's centring)
    normalize: str = "none"


@dataclass
class _LayerPlan:
    attention: torch.nn.Module
    value_module: torch.nn.Module
    values: Callable[[torch.Tensor], torch.Tensor]  # the value module's output -> [batch, tokens, kv heads, hd]
    z_hook: Hook                                    # blocks.L.attn.hook_z: the z the sources read
    heads: int
    head_dim: int
    sources: dict[int, _SourcePlan] = field(default_factory=dict)


def _layer_plans(model: PreTrainedModel, sources: list[UnitSource], rows: list[Row]) -> dict[int, _LayerPlan]:
    """A plan for each layer some row needs; layers or sources that cannot be attributed are left out, each with
    one line on stderr."""
    backbone, config = model.base_model, model.config
    plans: dict[int, _LayerPlan | None] = {}  # None: a layer that cannot be attributed
    for index in sorted({row.source for row in rows}):
        source = sources[index]
        kind = attribution_kind(model, source)
        if kind is None:
            continue
        if source.layer not in plans:
            plans[source.layer] = _layer_plan(backbone, config, source.layer)
            if plans[source.layer] is None:
                _note(f"layer {source.layer}: its value vectors are not where featureatlas reads them in this "
                      f"{config.model_type} model; no attributions for its heads or hook_z dictionaries")
        plan = plans[source.layer]
        if plan is None:
            continue
        if kind == "head":
            w_o = input_to_output_matrix(get_submodule(backbone, plan.z_hook.module)).float()
            per_head = w_o.reshape(plan.heads, plan.head_dim, -1)
            plan.sources[index] = _SourcePlan("head", gram=per_head @ per_head.transpose(1, 2))
        else:
            linear = encoder_linear(source.dictionary)
            if linear is None:
                _note(f"{source.name}: its encoder ({source.dictionary.architecture}) is not linear in its input; "
                      "no attributions for it")
                continue
            w, constant = linear
            plan.sources[index] = _SourcePlan("dictionary", w=w, constant=constant, w_sum=w.sum(0),
                                              normalize=source.dictionary.normalize)
    return {layer: plan for layer, plan in plans.items() if plan is not None and plan.sources}


def _layer_plan(backbone: torch.nn.Module, config: object, layer: int) -> _LayerPlan | None:
    z_hook = resolve_hook(f"blocks.{layer}.attn.hook_z", backbone, config.model_type)
    attention = get_submodule(backbone, z_hook.module.rsplit(".", 1)[0])
    heads = n_query_heads(config)
    width = input_to_output_matrix(get_submodule(backbone, z_hook.module)).shape[0]
    head_dim = width // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    found = value_reader(attention, heads, kv, head_dim)
    if found is None or width % heads or heads % kv:
        return None
    return _LayerPlan(attention, found[0], found[1], z_hook, heads, head_dim)


def value_reader(attention: torch.nn.Module, heads: int, kv: int, head_dim: int
                 ) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]] | None:
    """The module whose output holds an attention module's value vectors, and how to take them from it as
    [batch, tokens, kv heads, head_dim]; None for a layout not known here."""
    if isinstance(getattr(attention, "v_proj", None), torch.nn.Module):  # LLaMA-like, OPT, Phi, GPT-J
        return attention.v_proj, lambda y: y.unflatten(-1, (kv, head_dim))
    if isinstance(getattr(attention, "c_attn", None), torch.nn.Module):  # GPT-2: q, k, v side by side
        return attention.c_attn, lambda y: y[..., 2 * heads * head_dim:].unflatten(-1, (heads, head_dim))
    if isinstance(getattr(attention, "query_key_value", None), torch.nn.Module):  # GPT-NeoX: q, k, v per head
        return attention.query_key_value, lambda y: y.unflatten(-1, (heads, 3 * head_dim))[..., 2 * head_dim:]
    if isinstance(getattr(attention, "qkv_proj", None), torch.nn.Module):  # Phi-3: all q, then k, then v
        return attention.qkv_proj, lambda y: y[..., (heads + kv) * head_dim:].unflatten(-1, (kv, head_dim))
    return None


def encoder_linear(dictionary: Dictionary) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W [d_in, d_sae], constant [d_sae]), float32, such that the pre-activation of the dictionary's encode is
    N(x) @ W + constant (N: its input normalisation, b_dec's subtraction left to the constant); None when the
    encode is not of that form."""
    t = dictionary.tensors
    if dictionary.activation in ("relu", "jumprelu", "topk", "abstopk"):
        w, b = t["W_enc"].float(), t["b_enc"].float()
        if dictionary.rescale_acts_by_decoder_norm:
            scale = t["W_dec"].float().norm(dim=-1)
            w, b = w * scale, b * scale
    elif dictionary.activation == "gated":
        w, b = t["W_enc"].float() * t["r_mag"].float().exp(), t["b_mag"].float()
    elif dictionary.activation.startswith("sparsify_"):
        w, b = t["encoder.weight"].float().T, t["encoder.bias"].float()
    else:
        return None
    if dictionary.subtract_b_dec:
        b = b - t["b_dec"].float() @ w
    return w.contiguous(), b


# ---- one batch ----

class _Stop(Exception):
    """Raised after the deepest layer needed: later layers and the LM head are never computed."""


class _NoWeights(Exception):
    """An attention module gave no weights in eager attention (a transformers that does not switch at run time)."""


def _run_batch(model: PreTrainedModel, layers: dict[int, _LayerPlan], sources: list[UnitSource], rows: list[Row],
               batch: list[tuple[int, list[int], list[int]]], out: list[Attribution | None]) -> None:
    """One forward pass of a batch of contexts ((context id, token ids, indices of its rows)); fills out."""
    backbone = model.base_model
    device = next(model.parameters()).device
    tokens = make_batch([Context(cid, 0, 0, ids) for cid, ids, _ in batch], False, 0)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for layer, plan in layers.items():
        handles.append(plan.value_module.register_forward_hook(
            lambda m, args, y: captured.__setitem__("v", y[0] if isinstance(y, tuple) else y)))
        handles.append(read_hook(backbone, plan.z_hook, lambda z: captured.__setitem__("z", z)))
        handles.append(plan.attention.register_forward_hook(
            lambda m, args, output, layer=layer, plan=plan: _attend(
                layer, plan, output, captured, sources, rows, batch, out)))
    deepest = blocks_of(backbone, model.config.model_type)[max(layers)]
    handles.append(deepest.register_forward_hook(_stop))
    mask = None
    if tokens.padded:  # at the end: causal attention never lets a real token see it
        mask = (torch.arange(tokens.input_ids.shape[1])[None, :] < tokens.lengths[:, None]).to(device)
    try:
        with torch.inference_mode():
            backbone(input_ids=tokens.input_ids.to(device), attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _stop(module: torch.nn.Module, args: object, output: object) -> None:
    raise _Stop


def _attend(layer: int, plan: _LayerPlan, output: object, captured: dict[str, torch.Tensor],
            sources: list[UnitSource], rows: list[Row], batch: list[tuple[int, list[int], list[int]]],
            out: list[Attribution | None]) -> None:
    """At the end of a layer's attention: its weights, value vectors and z give its sources' rows."""
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if not isinstance(weights, torch.Tensor):
        raise _NoWeights(f"layer {layer}: its attention module returned no weights in eager attention")
    n, width = weights.shape[0], weights.shape[-1]
    exact = weights.dtype == captured["z"].dtype == torch.float32  # else 16-bit: the model rounds more
    v = plan.values(captured["v"].reshape(n, width, -1)).float()  # [b, T, kv heads, hd]
    v = v.repeat_interleave(plan.heads // v.shape[2], dim=2)  # [b, T, H, hd]: each query head's values
    z = captured["z"].reshape(n, width, -1).float()
    picked = [(b, i) for b, (_, _, indices) in enumerate(batch) for i in indices if rows[i].source in plan.sources]
    if not picked:
        return
    b_idx = torch.tensor([b for b, _ in picked], device=v.device)
    pos = torch.tensor([rows[i].position for _, i in picked], device=v.device)
    a = weights[b_idx, :, pos, :].float()  # [rows, H, T]: from each row's max token to every position
    if not _rebuilds_z(a, v, z, b_idx, pos, exact):
        _note(f"layer {layer}: its attention weights and value vectors do not rebuild its z in this model; no "
              "attributions for its heads or hook_z dictionaries")
        plan.sources.clear()
        return
    by_source: dict[int, list[int]] = defaultdict(list)
    for k, (_, i) in enumerate(picked):
        by_source[rows[i].source].append(k)
    for index, ks in by_source.items():
        k = torch.tensor(ks, device=v.device)
        units = torch.tensor([rows[picked[j][1]].unit for j in ks], device=v.device)
        spec = plan.sources[index]
        if spec.kind == "head":
            shares, weight_rows, constants = _head_shares(a[k], v, b_idx[k], units, spec), a[k, units], None
        else:
            shares, constants = _dictionary_shares(a[k], v, z, b_idx[k], pos[k], units, spec, plan)
            weight_rows = None
        shares, positions = shares.cpu().numpy(), pos[k].tolist()
        weight_rows = None if weight_rows is None else weight_rows.cpu().numpy()
        constants = None if constants is None else constants.cpu().tolist()
        for j, (position, row_index) in enumerate(zip(positions, (picked[q][1] for q in ks), strict=True)):
            out[row_index] = Attribution(
                shares=shares[j, :position + 1].astype(np.float32),
                weights=None if weight_rows is None else weight_rows[j, :position + 1].astype(np.float32),
                constant=None if constants is None else float(constants[j]))


def _rebuilds_z(a: torch.Tensor, v: torch.Tensor, z: torch.Tensor, b_idx: torch.Tensor, pos: torch.Tensor,
                exact: bool) -> bool:
    """Whether sum_s a_h(t, s) v_h(s) is the z the model computed at each row's max token: the check that the
    value vectors were read where the model keeps them, which a wrong read fails by far more than rounding (a
    few rows suffice; a 16-bit model rounds its z more)."""
    take = slice(0, 8)
    rebuilt = torch.einsum("rhs,rshd->rhd", a[take], v[b_idx[take]]).flatten(1)
    actual = z[b_idx[take], pos[take]]
    return bool((rebuilt - actual).norm() <= (1e-2 if exact else 5e-2) * actual.norm() + 1e-6)


def _head_shares(a: torch.Tensor, v: torch.Tensor, b_idx: torch.Tensor, units: torch.Tensor, spec: _SourcePlan
                 ) -> torch.Tensor:
    """[rows, T]: a_h(t, s) ||v_h(s) W_O[h]||, from the norms through the gram matrix (as heads.py's)."""
    vh = v[b_idx, :, units]  # [rows, T, hd]
    gram = spec.gram.to(v.device)[units]  # [rows, hd, hd]
    norms = torch.einsum("rsd,rde,rse->rs", vh, gram, vh).clamp_min(0).sqrt()
    return a[torch.arange(len(units), device=a.device), units] * norms


def _dictionary_shares(a: torch.Tensor, v: torch.Tensor, z: torch.Tensor, b_idx: torch.Tensor, pos: torch.Tensor,
                       units: torch.Tensor, spec: _SourcePlan, plan: _LayerPlan
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, T] direct feature attributions and [rows] constants (module docstring): context by context, in
    chunks of rows, so no [rows, T, d_in] tensor is ever formed."""
    w = spec.w.to(v.device)
    heads, head_dim, width = plan.heads, plan.head_dim, a.shape[-1]
    d_in = heads * head_dim
    shares = torch.empty(len(units), width, device=v.device)
    value_sums = v.sum(-1) if spec.normalize == "layer_norm" else None  # [b, T, H]
    chunk = max(1, _WORK_FLOATS // (width * heads))
    for b in b_idx.unique().tolist():
        mine = (b_idx == b).nonzero().squeeze(1)
        for lo in range(0, len(mine), chunk):
            k = mine[lo:lo + chunk]
            wf = w[:, units[k]].T.reshape(-1, heads, head_dim)  # each row's feature's encoder column, by head
            weights = a[k].transpose(1, 2)  # [rows, T, H]
            raw = (torch.einsum("shd,rhd->rsh", v[b], wf) * weights).sum(-1)  # [rows, T]: p_s . W[:, f]
            zt = z[b, pos[k]]  # [rows, d_in]: what the dictionary read at the max token
            if spec.normalize == "constant_norm_rescale":
                raw = raw * (math.sqrt(d_in) / zt.norm(dim=-1, keepdim=True))
            elif spec.normalize == "layer_norm":
                mean_part = (weights * value_sums[b]).sum(-1) / d_in  # [rows, T]: the mean of p_s
                raw = (raw - mean_part * spec.w_sum.to(v.device)[units[k], None]) / (
                    zt.std(dim=-1, keepdim=True) + _LN_EPS)
            shares[k] = raw
    return shares, spec.constant.to(v.device)[units]


def _note(text: str) -> None:
    print(f"featureatlas: attributions: {text}", file=sys.stderr)
