"""Statistics, histograms, bottom / quantile / random examples and logit effects against brute force.

Each context is run alone (no padding, no batching) and every expectation is computed from those activations
with plain Python and numpy, independently of the accumulators' vectorised code.
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import transformers

from featureatlas.harvest.accumulators import Backend
from featureatlas.harvest.logits import extremes
from featureatlas.harvest.reductions import reduce_eager, reducer
from featureatlas.harvest.run import HarvestConfig, harvest
from featureatlas.load.architectures import architecture_of, blocks_of, get_submodule
from featureatlas.store.encoding import rounding_bound
from featureatlas.store.sampling import sampling_keys

from helpers.tiny_models import save_tiny_model, write_corpus

CONTEXT_LENGTH, K, INTERVALS, PER_INTERVAL, RANDOM, SEED = 16, 4, 4, 2, 3, 7


def run_contexts_alone(model_dir: Path, corpus: Path) -> tuple[list[list[int]], dict[str, list[np.ndarray]]]:
    """Token ids of every context, and per source ('mlp', 'resid') a [layers, tokens, units] array per context."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    arch = architecture_of(model.config.model_type)
    contexts = []
    for file in sorted(corpus.glob("*.txt")):
        if file.read_text().strip():
            ids = tokenizer(file.read_text(), add_special_tokens=False)["input_ids"]
            contexts += [[tokenizer.bos_token_id] + ids[s:s + CONTEXT_LENGTH - 1]
                         for s in range(0, len(ids), CONTEXT_LENGTH - 1)]
    captured: dict[str, list[torch.Tensor]] = {"mlp": [], "resid": []}
    for block in blocks_of(model.base_model, model.config.model_type):
        get_submodule(block, arch.mlp_out_proj).register_forward_pre_hook(
            lambda m, args: captured["mlp"].append(args[0].reshape(-1, args[0].shape[-1]).clone()))
        block.register_forward_hook(lambda m, a, out: captured["resid"].append(
            (out[0] if isinstance(out, tuple) else out).reshape(-1, out[0].shape[-1] if isinstance(out, tuple)
                                                                else out.shape[-1]).clone()))
    acts: dict[str, list[np.ndarray]] = {"mlp": [], "resid": []}
    with torch.no_grad():
        for ids in contexts:
            for part in captured.values():
                part.clear()
            model(torch.tensor([ids]))
            for name, part in captured.items():
                acts[name].append(torch.stack(part).numpy())
    return contexts, acts


def histogram_bin(v: float) -> int:
    """The documented bin of one value, computed with math instead of float bits."""
    if v == 0:
        return 0
    a = abs(v)
    if a < 2.0 ** -16:
        b = 1
    elif a >= 2.0 ** 16:
        b = 130
    else:
        e = math.floor(math.log2(a))
        b = 2 + (e + 16) * 4 + math.floor((a / 2.0 ** e - 1) * 4)
    return b if v > 0 else -b


# The harvest options that choose each backend (accumulators.choose_backend; on CPU, GRAPHS runs eagerly through
# the CUDA graphs' buffers and in-place state)
BACKENDS = {Backend.TENSOR: dict(native=False), Backend.NATIVE: dict(native=True),
            Backend.FIXED: dict(fixed_shapes=True, cuda_graphs=False), Backend.GRAPHS: dict(fixed_shapes=True)}


@pytest.fixture(scope="module", params=[("llama", "off", Backend.NATIVE), ("gpt2", "on", Backend.NATIVE),
                                        ("llama", "off", Backend.GRAPHS), ("llama", "off", Backend.TENSOR)],
                ids=["llama-native", "gpt2-native-compiled", "llama-graphs", "llama-tensor"])
def harvested(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The reductions run eagerly for one model and through torch.compile for the other: both are exact. The lists
    merge in the native loops (where a compiler builds them), in fixed shapes through the CUDA graphs' path, as on
    CUDA (no host synchronisation), and with tensor operations: exact every way."""
    model_type, compile_mode, backend = request.param
    tmp = tmp_path_factory.mktemp(model_type)
    model_dir = save_tiny_model(model_type, tmp / "model")
    corpus = write_corpus(tmp / "corpus")
    store = tmp / "store.duckdb"
    harvest(HarvestConfig(model=str(model_dir), corpus=corpus, out=store, context_length=CONTEXT_LENGTH, top_k=K,
                          batch_size=5, dtype="float32", device="cpu", progress=False, resid="all",
                          intervals=INTERVALS, per_interval=PER_INTERVAL, random_examples=RANDOM,
                          histogram_every=1, seed=SEED, logits=5, compile=compile_mode, **BACKENDS[backend]))
    contexts, acts = run_contexts_alone(model_dir, corpus)
    return model_type, model_dir, duckdb.connect(str(store), read_only=True), contexts, acts


def per_unit(con: duckdb.DuckDBPyConnection, sql: str) -> dict:
    return {(s, layer, unit): rows for s, layer, unit, rows in con.execute(sql).fetchall()}


@pytest.mark.model
def test_statistics_and_histograms_count_every_token(harvested) -> None:
    _, _, con, contexts, acts = harvested
    stats = {(s, layer, unit): row for s, layer, unit, *row in con.execute(
        "SELECT source, layer, unit, n_tokens, n_firing, mean, std, min_activation, max_activation "
        "FROM statistics").fetchall()}
    hists = per_unit(con, "SELECT source, layer, unit, map_from_entries(list((bin, count))) FROM histograms "
                          "GROUP BY ALL")
    for source, per_context in acts.items():
        counted = np.concatenate([a[:, 1:] for a in per_context], axis=1)  # [layers, tokens, units]; no BOS
        for layer in range(counted.shape[0]):
            for unit in range(counted.shape[2]):
                values = counted[layer, :, unit].astype(np.float64)
                n, firing, mean, std, lo, hi = stats[(source, layer, unit)]
                assert (n, firing) == (len(values), int((values > 0).sum()))
                np.testing.assert_allclose([mean, std, lo, hi], [values.mean(), values.std(), values.min(),
                                                                 values.max()], rtol=1e-4, atol=1e-5)
                expected: dict[int, int] = {}
                for v in counted[layer, :, unit].tolist():
                    expected[histogram_bin(v)] = expected.get(histogram_bin(v), 0) + 1
                assert hists[(source, layer, unit)] == expected, (source, layer, unit)


@pytest.mark.model
def test_bottom_examples_are_the_most_negative_contexts(harvested) -> None:
    model_type, _, con, _, acts = harvested
    stored = per_unit(con, "SELECT source, layer, unit, list((context_id, max_position, max_activation) "
                           "ORDER BY rank) FROM examples WHERE example_kind = 'bottom' GROUP BY ALL")
    sources = ["resid", "mlp"] if model_type == "llama" else ["resid"]  # GPT-2's GELU neurons are not signed
    assert {s for s, _, _ in stored} == set(sources)
    for source in sources:
        n_layers, _, n_units = acts[source][0].shape
        for layer in range(n_layers):
            for unit in range(n_units):
                scores = sorted((float(a[layer, 1:, unit].min()), cid, int(a[layer, 1:, unit].argmin()) + 1)
                                for cid, a in enumerate(acts[source]))[:K]
                rows = stored[(source, layer, unit)]
                assert [(c, p) for c, p, _ in rows] == [(c, p) for _, c, p in scores]
                np.testing.assert_allclose([v for _, _, v in rows], [s for s, _, _ in scores], rtol=1e-5, atol=1e-6)


@pytest.mark.model
def test_quantile_and_random_examples_are_seeded_uniform_samples(harvested) -> None:
    """Per interval of [0, W) (W the power of two above the unit's max), the contexts with the smallest keys."""
    _, _, con, contexts, acts = harvested
    keys = sampling_keys(np.arange(len(contexts)), SEED).tolist()
    quantile = per_unit(con, "SELECT source, layer, unit, list((interval_lo, interval_hi, context_id, max_position) "
                             "ORDER BY interval_lo, rank) FROM examples WHERE example_kind = 'quantile' GROUP BY ALL")
    random = per_unit(con, "SELECT source, layer, unit, list(context_id ORDER BY rank) FROM examples "
                           "WHERE example_kind = 'random' GROUP BY ALL")
    for source, per_context in acts.items():
        n_layers, _, n_units = per_context[0].shape
        for layer in range(n_layers):
            for unit in range(n_units):
                maxima = [float(a[layer, 1:, unit].max()) for a in per_context]
                firing = sorted((keys[cid], cid) for cid, m in enumerate(maxima) if m > 0)
                assert random.get((source, layer, unit), []) == [cid for _, cid in firing[:RANDOM]]
                if not firing:
                    continue
                width = 2.0 ** math.frexp(max(maxima))[1] / INTERVALS
                expected = []
                for interval in range(INTERVALS):
                    inside = sorted((keys[cid], cid) for cid, m in enumerate(maxima)
                                    if m > 0 and min(math.floor(m / width), INTERVALS - 1) == interval)
                    expected += [(interval * width, (interval + 1) * width, cid,
                                  int(per_context[cid][layer, 1:, unit].argmax()) + 1)
                                 for _, cid in inside[:PER_INTERVAL]]
                got = [(pytest.approx(lo), pytest.approx(hi), c, p) for lo, hi, c, p in quantile[(source, layer, unit)]]
                assert got == expected, (source, layer, unit)


@pytest.mark.model
def test_sampled_examples_keep_their_per_token_activations(harvested) -> None:
    _, _, con, contexts, acts = harvested
    rows = con.execute("SELECT source, layer, unit, context_id, activations FROM examples "
                       "WHERE example_kind IN ('quantile', 'random', 'bottom') USING SAMPLE 300 ROWS").fetchall()
    for source, layer, unit, cid, stored in rows:
        expected = acts[source][cid][layer, :, unit]  # the store's 16-bit grid adds at most its documented rounding
        np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5 + rounding_bound(np.abs(expected).max()))


@pytest.mark.model
def test_logit_effects_read_the_output_direction_through_the_unembedding(harvested) -> None:
    model_type, model_dir, con, _, _ = harvested
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    backbone = model.base_model
    final_norm = backbone.norm if model_type == "llama" else backbone.ln_f
    readout = model.get_output_embeddings().weight.detach() * final_norm.weight.detach()  # [vocab, d_model]
    block = blocks_of(backbone, model_type)[1]
    w_out = block.mlp.down_proj.weight.detach().T if model_type == "llama" else block.mlp.c_proj.weight.detach()
    stored = per_unit(con, "SELECT source, layer, unit, list(token_id ORDER BY rank) FROM logit_effects "
                           "WHERE layer = 1 AND polarity = 'top' GROUP BY ALL")
    effects = {(s, u): v for s, u, v in con.execute(
        "SELECT source, unit, list(effect ORDER BY rank) FROM logit_effects WHERE layer = 1 AND polarity = 'bottom' "
        "GROUP BY ALL").fetchall()}
    for unit in range(w_out.shape[0]):
        logits = readout @ w_out[unit]
        assert stored[("mlp", 1, unit)] == logits.topk(5).indices.tolist()
        np.testing.assert_allclose(effects[("mlp", unit)], logits.topk(5, largest=False).values.numpy(), rtol=1e-4,
                                   atol=1e-5)
    for unit in range(readout.shape[1]):  # basis vector `unit`, whatever the layer
        assert stored[("resid", 1, unit)] == readout[:, unit].topk(5).indices.tolist()
    resid = per_unit(con, "SELECT source, layer, unit, list(effect ORDER BY polarity, rank) FROM logit_effects "
                          "WHERE source = 'resid' GROUP BY ALL")
    assert len({layer for _, layer, _ in resid}) > 1
    assert all(effects == resid[("resid", 1, unit)] for (_, _, unit), effects in resid.items())
    tokens = dict(con.execute("SELECT token_id, token FROM logit_effects").fetchall())
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert all(tokens[i] == tokenizer.decode([i]) for i in tokens)


@pytest.mark.model
def test_dictionary_features_are_saelens_encode_of_the_hooked_tensor(tmp_path: Path) -> None:
    """A JumpReLU SAE on hook_resid_post and a transcoder on ln2.hook_normalized -> hook_mlp_out, saved with
    SAELens's own classes: every feature's top examples are those of SAELens's encode of the brute-force tensor."""
    from sae_lens import SAE

    model_dir = save_tiny_model("llama", tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus")
    hidden = 32
    folders = {}
    for name, cfg in {
        "res": {"architecture": "jumprelu", "d_in": hidden, "d_sae": 40, "metadata": {
            "hook_name": "blocks.1.hook_resid_post"}},
        "tc": {"architecture": "transcoder", "d_in": hidden, "d_sae": 40, "d_out": hidden,
               "apply_b_dec_to_input": False, "metadata": {"hook_name": "blocks.2.ln2.hook_normalized",
                                                            "hook_name_out": "blocks.2.hook_mlp_out"}},
    }.items():
        sae = SAE.from_dict({"dtype": "float32", "device": "cpu", **cfg})
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for pname, p in sae.named_parameters():
                p.copy_(torch.rand(p.shape, generator=g) * 0.3 if pname == "threshold"
                        else torch.randn(p.shape, generator=g) * 0.5)
        sae.save_model(tmp_path / name)
        folders[name] = sae
    store = tmp_path / "store.duckdb"
    harvest(HarvestConfig(model=str(model_dir), corpus=corpus, out=store, context_length=CONTEXT_LENGTH, top_k=K,
                          batch_size=4, dtype="float32", device="cpu", progress=False, layers="none",
                          saes=[str(tmp_path / "res"), f"tc={tmp_path / 'tc'}"], seed=SEED, compile="off"))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    contexts, _ = run_contexts_alone(model_dir, corpus)
    seen: dict[str, torch.Tensor] = {}
    layers = model.base_model.layers
    layers[1].register_forward_hook(lambda m, a, out: seen.update(res=out[0] if isinstance(out, tuple) else out))
    norm = layers[2].post_attention_layernorm
    norm.register_forward_pre_hook(lambda m, a: seen.update(
        tc=a[0] * torch.rsqrt(a[0].pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)))
    features: dict[str, list[np.ndarray]] = {"res": [], "tc": []}
    with torch.no_grad():
        for ids in contexts:
            model(torch.tensor([ids]))
            for name in features:
                features[name].append(folders[name].encode(seen[name][0]).numpy())
    con = duckdb.connect(str(store), read_only=True)
    assert con.execute("SELECT source, layer, kind, architecture, hook_out_name FROM sources ORDER BY source"
                       ).fetchall() == [("sae:res", 1, "sae", "jumprelu", None),
                                        ("transcoder:tc", 2, "transcoder", "transcoder", "blocks.2.hook_mlp_out")]
    stored = per_unit(con, "SELECT source, layer, unit, list((context_id, max_position) ORDER BY rank) "
                           "FROM examples WHERE example_kind = 'top' GROUP BY ALL")
    firing = dict(con.execute("SELECT source || '/' || unit, n_firing FROM statistics").fetchall())
    for name, source, layer in (("res", "sae:res", 1), ("tc", "transcoder:tc", 2)):
        for unit in range(40):  # a feature's top examples are contexts where it fires
            scores = sorted((-float(f[1:, unit].max()), cid, int(f[1:, unit].argmax()) + 1)
                            for cid, f in enumerate(features[name]) if f[1:, unit].max() > 0)[:K]
            assert stored.get((source, layer, unit), []) == [(c, p) for _, c, p in scores], (source, unit)
            assert firing[f"{source}/{unit}"] == sum(int((f[1:, unit] > 0).sum()) for f in features[name])
    assert con.execute("SELECT count(*) FROM logit_effects WHERE source = 'transcoder:tc'").fetchone()[0] == 40 * 2 * 10


@pytest.mark.model
def test_sparsify_run_folder_reads_module_outputs_and_transcoder_inputs(tmp_path: Path) -> None:
    """An SAE on `layers.0` (the block's output) and a transcoder on `layers.2.mlp` (reads the MLP's input)."""
    from test_dictionaries import sparsify_folder, sparsify_reference

    model_dir = save_tiny_model("llama", tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    sparsify_folder(run / "layers.0", seed=1, d_in=32, num_latents=40, k=4)
    sparsify_folder(run / "layers.2.mlp", seed=2, d_in=32, num_latents=40, k=4, transcode=True)
    store = tmp_path / "store.duckdb"
    harvest(HarvestConfig(model=str(model_dir), corpus=corpus, out=store, context_length=CONTEXT_LENGTH, top_k=K,
                          batch_size=4, dtype="float32", device="cpu", progress=False, layers="none",
                          saes=[f"sp={run}"], compile="off"))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen: dict[str, torch.Tensor] = {}
    model.base_model.layers[0].register_forward_hook(lambda m, a, out: seen.update(
        sae=out[0] if isinstance(out, tuple) else out))
    model.base_model.layers[2].mlp.register_forward_pre_hook(lambda m, a: seen.update(tc=a[0]))
    contexts, _ = run_contexts_alone(model_dir, corpus)
    features: dict[str, list[np.ndarray]] = {"sae": [], "tc": []}
    with torch.no_grad():
        for ids in contexts:
            model(torch.tensor([ids]))
            features["sae"].append(sparsify_reference(run / "layers.0", seen["sae"][0]).numpy())
            features["tc"].append(sparsify_reference(run / "layers.2.mlp", seen["tc"][0]).numpy())
    con = duckdb.connect(str(store), read_only=True)
    assert con.execute("SELECT source, layer, hook, architecture FROM sources ORDER BY layer").fetchall() == [
        ("sae:sp/layers.0", 0, "layers.0:output", "topk"),
        ("transcoder:sp/layers.2.mlp", 2, "layers.2.mlp:input", "topk_transcoder")]
    stored = per_unit(con, "SELECT source, layer, unit, list((max_activation, context_id) ORDER BY rank) "
                           "FROM examples WHERE example_kind = 'top' GROUP BY ALL")
    for name, source, layer in (("sae", "sae:sp/layers.0", 0), ("tc", "transcoder:sp/layers.2.mlp", 2)):
        for unit in range(40):
            scores = sorted((-float(f[1:, unit].max()), cid) for cid, f in enumerate(features[name])
                            if f[1:, unit].max() > 0)[:K]
            got = stored.get((source, layer, unit), [])
            np.testing.assert_allclose([v for v, _ in got], [-s for s, _ in scores], rtol=1e-5, atol=1e-6)
            for rank, ((value, cid), (_, expected)) in enumerate(zip(got, scores, strict=True)):
                near_tie = any(abs(value - other) < 1e-5 for j, (other, _) in enumerate(got) if j != rank)
                assert cid == expected or near_tie, (source, unit)  # the corpus repeats itself: equal contexts


@pytest.mark.model
def test_sparse_features_every_accumulator_from_the_non_zeros_alone(tmp_path: Path) -> None:
    """A top-k SAE with dead and rare features, batches with padding: statistics, histograms, top, quantile and
    random examples and their per-token activations (BOS included) all equal brute force on each context alone;
    a feature's examples are only contexts where it fires."""
    from featureatlas.load.dictionaries import load_dictionaries

    from helpers.tiny_models import saelens_sae

    model_dir = save_tiny_model("llama", tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus")
    folder = saelens_sae(tmp_path / "sae", 32, "blocks.1.hook_resid_post")
    dictionary = load_dictionaries(folder)[0]
    with torch.no_grad():  # features 0-4 dead (never among the top 4), 5-9 rare or dead (large negative biases)
        dictionary.tensors["W_enc"][:, :5] = 0
        dictionary.tensors["b_enc"][:5] = -100
        dictionary.tensors["b_enc"][5:10] = torch.tensor([-2.0, -2.5, -3.0, -3.5, -4.0])
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in dictionary.tensors.items()}, folder / "sae_weights.safetensors")
    store = tmp_path / "store.duckdb"
    harvest(HarvestConfig(model=str(model_dir), corpus=corpus, out=store, context_length=CONTEXT_LENGTH, top_k=K,
                          batch_size=3, dtype="float32", device="cpu", progress=False, layers="none",
                          saes=[f"f={folder}"], intervals=INTERVALS, per_interval=PER_INTERVAL,
                          random_examples=RANDOM, seed=SEED, compile="off"))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen: dict[str, torch.Tensor] = {}
    model.base_model.layers[1].register_forward_hook(lambda m, a, out: seen.update(
        res=out[0] if isinstance(out, tuple) else out))
    contexts, _ = run_contexts_alone(model_dir, corpus)
    features = []
    with torch.no_grad():
        for ids in contexts:
            model(torch.tensor([ids]))
            features.append(dictionary.encode(seen["res"][0]).numpy())
    assert any(len(ids) < CONTEXT_LENGTH for ids in contexts)  # padded batches
    keys = sampling_keys(np.arange(len(contexts)), SEED).tolist()
    con = duckdb.connect(str(store), read_only=True)
    stats = {u: row for u, *row in con.execute("SELECT unit, n_tokens, n_firing, mean, std, min_activation, "
                                                 "max_activation FROM statistics").fetchall()}
    hists = dict(con.execute("SELECT unit, map_from_entries(list((bin, count))) FROM histograms GROUP BY ALL"
                             ).fetchall())
    examples = {(kind, u): rows for kind, u, rows in con.execute(
        "SELECT example_kind, unit, list((context_id, max_position, max_activation, activations) ORDER BY "
        "interval_lo, rank) FROM examples GROUP BY ALL").fetchall()}
    rare = 0
    for unit in range(40):
        values = np.concatenate([f[1:, unit] for f in features]).astype(np.float64)
        n, firing, mean, std, lo, hi = stats[unit]
        assert (n, firing) == (len(values), int((values > 0).sum())), unit
        np.testing.assert_allclose([mean, std, lo, hi], [values.mean(), values.std(), values.min(), values.max()],
                                   rtol=1e-4, atol=1e-5)
        expected_hist: dict[int, int] = {}
        for v in values.tolist():
            expected_hist[histogram_bin(v)] = expected_hist.get(histogram_bin(v), 0) + 1
        assert hists[unit] == expected_hist, unit
        maxima = [float(f[1:, unit].max()) for f in features]
        fired = [cid for cid, m in enumerate(maxima) if m > 0]
        rare += 0 < len(fired) < K
        top = sorted(fired, key=lambda cid: (-maxima[cid], cid))[:K]
        got = examples.get(("top", unit), [])
        assert [c for c, *_ in got] == top, unit
        by_key = sorted(fired, key=lambda cid: keys[cid])
        assert [c for c, *_ in examples.get(("random", unit), [])] == by_key[:RANDOM], unit
        quantiles = []
        if fired:
            width = 2.0 ** math.frexp(max(maxima))[1] / INTERVALS
            for interval in range(INTERVALS):
                quantiles += [c for c in by_key if min(math.floor(maxima[c] / width), INTERVALS - 1) == interval
                              ][:PER_INTERVAL]
        assert sorted(c for c, *_ in examples.get(("quantile", unit), [])) == sorted(quantiles), unit
        for kind in ("top", "random", "quantile"):
            for cid, position, value, acts in examples.get((kind, unit), []):
                f = features[cid][:, unit]
                assert position == int(f[1:].argmax()) + 1 and value == pytest.approx(maxima[cid], rel=1e-5)
                np.testing.assert_allclose(acts, f, rtol=1e-5, atol=1e-5 + rounding_bound(np.abs(f).max()))
    assert all(("top", unit) not in examples for unit in range(5)) and rare  # dead ones have none; some rare


@pytest.mark.model
def test_fixed_shapes_store_equals_the_list_form(tmp_path: Path) -> None:
    """The CUDA forms of the dense accumulators (FIXED, and GRAPHS through the CUDA graphs' buffers and in-place
    state, run eagerly here; compiled, on CUDA, in tests/test_gpu_parity.py) write exactly the store the CPU's
    native loops write, with the histogram sampled one context in 2 and a padded batch."""
    model_dir = save_tiny_model("llama", tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus")
    stores = []
    for backend, compile_mode in ((Backend.NATIVE, "off"), (Backend.FIXED, "off"), (Backend.GRAPHS, "off")):
        stores.append(tmp_path / f"{backend.value}-{compile_mode}.duckdb")
        harvest(HarvestConfig(model=str(model_dir), corpus=corpus, out=stores[-1], context_length=CONTEXT_LENGTH,
                              top_k=K, batch_size=7, dtype="float32", device="cpu", progress=False, resid="all",
                              intervals=INTERVALS, per_interval=PER_INTERVAL, random_examples=RANDOM,
                              histogram_every=2, seed=SEED, compile=compile_mode, **BACKENDS[backend]))
    queries = ["SELECT source, layer, unit, example_kind, rank, context_id, max_position, max_activation, "
               "interval_lo, activations FROM examples ORDER BY ALL",
               "SELECT * EXCLUDE (mean, std) FROM statistics ORDER BY ALL", "SELECT * FROM histograms ORDER BY ALL"]
    got = [[duckdb.connect(str(store), read_only=True).execute(q).fetchall() for q in queries] for store in stores]
    assert len(got[0][0]) > 1000 and got[0] == got[1] == got[2]


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [64, 48, 13])
def test_compiled_reductions_equal_the_eager_ones_for_any_context_length(tokens: int) -> None:
    """The compiled reducer splits tokens into chunks (16 for 64 and 48; one chunk of 13, a prime): the extremes
    and firing counts are exact, the sums equal to float32 rounding, with BOS and padding never counted."""
    gen = torch.Generator().manual_seed(tokens)
    acts = torch.randn((6, tokens, 40), generator=gen) * 3
    counted = torch.ones((6, tokens), dtype=torch.bool)
    counted[:, 0] = False
    counted[4, tokens // 2:] = counted[5, 3:] = False  # padded rows
    acts[4, tokens // 2:] = 1e6  # padding's values must not count
    with torch.inference_mode():
        got, want = reducer(True)(acts, counted, 1, True), reduce_eager(acts, counted, 1, True)
    for name, g, w in zip(("max", "min", "sum", "sum of squares", "firing"), got, want, strict=True):
        assert g.shape == w.shape, name
        if name in ("max", "min", "firing"):
            assert torch.equal(g, w), name
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4, msg=name)


@pytest.mark.parametrize("largest", [True, False])
def test_logit_extremes_by_blocks_equal_topk_over_the_whole_vocabulary(largest: bool) -> None:
    """The blockwise search finds what topk finds: the same values in the same order, at indices holding them
    (the same indices where values are distinct), ties across blocks and entries past the last block included."""
    gen = torch.Generator().manual_seed(3)
    distinct = torch.randn((16, 64 * 200), generator=gen)
    tied = torch.randint(0, 4, (16, 64 * 200), generator=gen).float()  # every row has thousands of ties
    tied[0, ::64] = 9 if largest else -9  # the best value once in each of many blocks
    ragged = torch.randn((16, 64 * 200 + 37), generator=gen)  # a vocabulary that is no whole number of blocks
    ragged[1, -5] = 99 if largest else -99  # the best entry past the last whole block
    for rows in (distinct, tied, ragged):
        indices, values = extremes(rows, 10, largest)
        want = rows.topk(10, dim=1, largest=largest)
        assert torch.equal(values, want.values)
        assert torch.equal(rows.gather(1, indices), values)
        assert all(len(set(r)) == 10 for r in indices.tolist())
    assert torch.equal(extremes(distinct, 10, largest)[0], distinct.topk(10, dim=1, largest=largest).indices)
