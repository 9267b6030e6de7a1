"""The harvest against brute force: every unit's top-k contexts, positions and activations, on tiny models."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import transformers

from featureatlas.harvest.run import HarvestConfig, harvest
from featureatlas.load.architectures import ARCHITECTURES, blocks_of, mlp_out_of, neurons_of
from featureatlas.store.encoding import rounding_bound

from helpers.tiny_models import MODEL_TYPES, save_tiny_model, write_corpus

pytestmark = pytest.mark.model

CONTEXT_LENGTH, TOP_K = 16, 5


def brute_force_activations(model_dir: Path, corpus: Path) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Every context, one at a time with no padding; returns token ids and [layers, tokens, neurons] each."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    contexts = []
    for file in sorted(corpus.glob("*.txt")):
        if not file.read_text().strip():
            continue  # whitespace-only documents are skipped
        ids = tokenizer(file.read_text(), add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), CONTEXT_LENGTH - 1):
            contexts.append([tokenizer.bos_token_id] + ids[start : start + CONTEXT_LENGTH - 1])
    blocks = blocks_of(model.base_model, model.config.model_type)
    captured: list[torch.Tensor] = []
    for block in blocks:
        mlp_out_of(block, model.config.model_type).register_forward_pre_hook(
            lambda m, args: captured.append(args[0].reshape(-1, args[0].shape[-1]).clone()))  # B = 1
    acts = []
    with torch.no_grad():
        for ids in contexts:
            captured.clear()
            model(torch.tensor([ids]))
            acts.append(torch.stack(captured))
    return contexts, acts


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_top_k_equals_brute_force(tmp_path: Path, model_type: str) -> None:
    model_dir = save_tiny_model(model_type, tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus")
    store = tmp_path / "store.duckdb"
    harvest(HarvestConfig(model=str(model_dir), corpus=corpus, out=store, context_length=CONTEXT_LENGTH,
                          top_k=TOP_K, batch_size=3, dtype="float32", device="cpu", progress=False))
    contexts, acts = brute_force_activations(model_dir, corpus)
    con = duckdb.connect(str(store), read_only=True)
    n_layers, n_neurons = acts[0].shape[0], acts[0].shape[2]
    assert con.execute("SELECT count(*) FROM units WHERE source = 'mlp'").fetchone()[0] == n_layers * n_neurons
    stored = {(layer, unit): rows for layer, unit, rows in con.execute(
        "SELECT layer, unit, list({rank: rank, context_id: context_id, max_position: max_position, "
        "max_activation: max_activation, activations: activations} ORDER BY rank) "
        "FROM examples WHERE source = 'mlp' AND example_kind = 'top' GROUP BY layer, unit").fetchall()}
    stored_tokens = dict(con.execute("SELECT context_id, token_ids FROM contexts").fetchall())
    for layer in range(n_layers):
        for unit in range(n_neurons):
            scores = []
            for cid, a in enumerate(acts):
                counted = a[layer, 1:, unit]  # the BOS position never counts
                pos = int(counted.argmax()) + 1
                scores.append((-float(counted.max()), cid, pos))
            expected = sorted(scores)[:TOP_K]
            rows = stored[(layer, unit)]
            assert [r["rank"] for r in rows] == list(range(1, TOP_K + 1))
            assert [r["context_id"] for r in rows] == [cid for _, cid, _ in expected], (layer, unit)
            assert [r["max_position"] for r in rows] == [pos for _, _, pos in expected]
            np.testing.assert_allclose([r["max_activation"] for r in rows], [-s for s, _, _ in expected],
                                       rtol=1e-5, atol=1e-6)
            for r in rows:
                assert stored_tokens[r["context_id"]] == contexts[r["context_id"]]
                expected = acts[r["context_id"]][layer, :, unit].numpy()  # plus the store's documented rounding
                np.testing.assert_allclose(r["activations"], expected, rtol=1e-5,
                                           atol=1e-5 + rounding_bound(np.abs(expected).max()))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_neuron_is_the_mlp_hidden_activation(tmp_path: Path, model_type: str) -> None:
    """Guards the architecture table: the hooked tensor is act(gate(x)) * up(x) (gated) or act(fc(x))."""
    model_dir = save_tiny_model(model_type, tmp_path / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    block = blocks_of(model.base_model, model_type)[1]
    mlp = block.mlp
    seen = {}
    mlp.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    mlp_out_of(block, model_type).register_forward_pre_hook(lambda m, args: seen.update(neurons=args[0]))
    with torch.no_grad():
        model(torch.tensor([[0, 5, 17, 42, 99]]))
        x = seen["x"]
        if model_type == "llama":
            expected = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        else:
            expected = mlp.act(mlp.c_fc(x))
    torch.testing.assert_close(seen["neurons"], expected)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_entry_finds_the_mlp_output_projection(model_type: str) -> None:
    sizes = dict(vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if model_type in ("gpt2", "gptj"):
        sizes |= dict(n_layer=2, n_embd=32, n_head=2, n_inner=48, rotary_dim=8)
    else:
        sizes |= dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=48, ffn_dim=48, word_embed_proj_dim=32, head_dim=16)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **sizes))
    proj = mlp_out_of(blocks_of(model.base_model, model_type)[1], model_type)
    seen = {}
    proj.register_forward_pre_hook(lambda m, args: seen.update(width=args[0].shape[-1]))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert neurons_of(proj) == seen["width"] == 48
