"""Attention heads as units, against a plain-transformers computation: each head's write rebuilt from the
model's own eager attention weights and value vectors (grouped-query attention included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from featureatlas.harvest.heads import head_sources, head_write_norms
from featureatlas.harvest.hooks import read_hook

from helpers.tiny_models import save_tiny_model

TOKENS = [[1, 5, 9, 14, 3, 22, 7, 40, 2], [3, 3, 8, 100, 41, 7, 9, 12, 5]]


def load(kind: str, root: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(save_tiny_model(kind, root / kind),
                                                             attn_implementation="eager").eval()


def values(model: transformers.PreTrainedModel, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """[batch, tokens, query heads, head_dim]: each query head's value vectors, from the layer's input."""
    config = model.config
    if config.model_type == "gpt2":
        block = model.transformer.h[layer]
        v = block.attn.c_attn(block.ln_1(hidden)).split(config.n_embd, dim=2)[2]
        return v.view(*v.shape[:2], config.n_head, -1)
    block = model.model.layers[layer]
    v = block.self_attn.v_proj(block.input_layernorm(hidden))
    v = v.view(*v.shape[:2], config.num_key_value_heads, -1)
    return v.repeat_interleave(config.num_attention_heads // config.num_key_value_heads, dim=2)


def out_proj(model: transformers.PreTrainedModel, layer: int) -> torch.Tensor:
    """[d_model, heads * head_dim]: y = W z."""
    if model.config.model_type == "gpt2":
        return model.transformer.h[layer].attn.c_proj.weight.T
    return model.model.layers[layer].self_attn.o_proj.weight


@pytest.mark.model
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_head_activations_are_the_norms_of_what_each_head_writes(kind: str, tmp_path: Path) -> None:
    model = load(kind, tmp_path)
    layers = [0, 2]
    sources = head_sources(model, layers)
    blocks = model.model.layers if kind == "llama" else model.transformer.h
    inputs: dict[int, torch.Tensor] = {}
    hooked: dict[int, torch.Tensor] = {}
    handles = [blocks[layer].register_forward_pre_hook(
        lambda m, args, kwargs, layer=layer: inputs.__setitem__(layer, args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for layer in layers]
    handles += [read_hook(model.base_model, s.hook, lambda x, layer=s.layer: hooked.__setitem__(layer, x))
                for s in sources]
    with torch.no_grad():
        out = model(torch.tensor(TOKENS), output_attentions=True)
    for handle in handles:
        handle.remove()
    for source in sources:
        layer = source.layer
        pattern = out.attentions[layer]  # [batch, heads, query, key]
        v = values(model, layer, inputs[layer])
        z = torch.einsum("bhts,bshd->bthd", pattern, v)
        w = out_proj(model, layer)
        heads, head_dim = z.shape[2], z.shape[3]
        writes = torch.stack([z[:, :, h] @ w[:, h * head_dim:(h + 1) * head_dim].T for h in range(heads)], dim=2)
        expected = writes.norm(dim=-1)  # [batch, tokens, heads]
        got = source.activations(hooked[layer], len(TOKENS), len(TOKENS[0]))
        assert source.name == "attn" and source.n_units == heads == model.config.num_attention_heads
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert (got >= 0).all() and got.max() > 0


def test_the_norm_through_the_gram_matrix_is_the_norm_of_the_write() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, 10, generator=g)  # heads, head_dim, d_model
    z = torch.randn(5, 12, generator=g, dtype=torch.float64).float()
    direct = torch.stack([(z[:, h * 4:(h + 1) * 4] @ w[h]).norm(dim=-1) for h in range(3)], dim=1)
    torch.testing.assert_close(head_write_norms(z, w @ w.transpose(1, 2)), direct, rtol=1e-5, atol=1e-5)


@pytest.mark.model
def test_a_harvest_with_heads_stores_them_without_logit_effects_and_with_neighbours(tmp_path: Path) -> None:
    import duckdb

    from featureatlas.cli import main

    from helpers.tiny_models import write_corpus

    model, corpus = save_tiny_model("llama", tmp_path / "model"), write_corpus(tmp_path / "corpus")
    out = tmp_path / "s.duckdb"
    assert main(["harvest", "--model", str(model), "--corpus", str(corpus), "--out", str(out), "--device", "cpu",
                 "--layers", "1", "--heads", "0-1", "--context-length", "16", "--tokens", "300", "--top-k", "3",
                 "--compile", "off"]) == 0
    con = duckdb.connect(str(out), read_only=True)
    assert con.execute("SELECT layer, n_units, kind FROM sources WHERE source = 'attn' ORDER BY layer").fetchall() \
        == [(0, 2, "attn"), (1, 2, "attn")]
    assert con.execute("SELECT count(*) FROM examples WHERE source = 'attn' AND example_kind = 'top'").fetchone()[0] \
        == 2 * 2 * 3
    assert con.execute("SELECT count(*) FROM logit_effects WHERE source = 'attn'").fetchone()[0] == 0
    assert con.execute("SELECT count(*), min(rank), max(rank) FROM neighbours WHERE source = 'mlp'").fetchone() \
        == (48 * 10, 1, 10)
    top = con.execute("SELECT layer, unit, context_id, max_position, max_activation FROM examples "
                      "WHERE source = 'attn' AND example_kind = 'top' AND rank = 1 ORDER BY layer, unit").fetchall()
    ids = dict(con.execute("SELECT context_id, token_ids FROM contexts").fetchall())
    con.close()

    # A store with heads reopens (verify, probe, serve, steer): the probe of a stored context gives its max
    from featureatlas.harvest.probe import load_prober

    prober = load_prober(None, [], store=out, device="cpu")
    assert {("attn", 0), ("attn", 1)} <= set(prober.sources)
    for layer, unit, context_id, position, value in top:
        probed = prober.unit(None, f"attn/{layer}/{unit}", token_ids=ids[context_id])
        assert probed.max_position == position
        assert probed.max_activation == pytest.approx(value, rel=1e-4)
