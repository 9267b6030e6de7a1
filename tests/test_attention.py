"""Where attention heads looked and what hook_z dictionaries read from each position (harvest/attention.py),
against plain transformers computations: the model's own eager attention weights, its value vectors and output
projection taken by hand, each context run alone; the store's rows, and a head's page in a real browser."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import transformers

from featureatlas.harvest.attention import Row, attribute, attribution_kind
from featureatlas.harvest.heads import head_sources
from featureatlas.harvest.hooks import read_hook
from featureatlas.harvest.sources import dictionary_sources, mlp_sources
from featureatlas.harvest.train_sae import TrainResult, save_saelens_folder
from featureatlas.load.dictionaries import Dictionary, load_dictionaries

from helpers.browser import expect
from helpers.tiny_models import MODEL_TYPES, save_tiny_model, write_corpus

GQA = {"num_attention_heads": 4, "num_key_value_heads": 2, "attention_bias": True}  # two query heads per kv head
HEADS, KV, HEAD_DIM, D_SAE = 4, 2, 8, 40
CONTEXTS = {10: [0, 5, 9, 14, 3, 22, 7, 40, 2, 17, 8, 31], 11: [0, 3, 3, 8, 100, 41, 7],
            12: [0, 50, 60, 70, 80, 90, 11, 12, 13]}  # three lengths: batches of two are padded
PLACES = [(10, 11), (10, 4), (11, 6), (12, 1), (12, 8)]  # (context, max position)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("gqa") / "model", **GQA)


@pytest.fixture(scope="module")
def eager(model_dir: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()


def load_sdpa(model_dir: Path) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    assert model.config._attn_implementation == "sdpa"
    return model


def reference(model: transformers.PreTrainedModel, layer: int, ids: list[int]) -> dict[str, torch.Tensor]:
    """One context run alone in eager attention: its attention weights [H, T, T] (output_attentions), each query
    head's value vectors [T, H, hd] from v_proj, z [T, H * hd] (o_proj's input) and o_proj's weight."""
    block = model.model.layers[layer]
    seen: dict[str, torch.Tensor] = {}
    handles = [block.register_forward_pre_hook(lambda m, args, kwargs: seen.__setitem__(
                   "x", args[0] if args else kwargs["hidden_states"]), with_kwargs=True),
               block.self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0]))]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
        v = block.self_attn.v_proj(block.input_layernorm(seen["x"]))[0]
    for handle in handles:
        handle.remove()
    v = v.view(len(ids), KV, HEAD_DIM).repeat_interleave(HEADS // KV, dim=1)
    return {"a": out.attentions[layer][0], "v": v, "z": seen["z"][0], "w_o": block.self_attn.o_proj.weight.detach()}


# --- heads ---------------------------------------------------------------------------------------------------------

@pytest.mark.model
def test_a_heads_weights_are_the_models_eager_ones_and_its_shares_rebuild_its_write(
        model_dir: Path, eager: transformers.PreTrainedModel) -> None:
    model = load_sdpa(model_dir)
    sources = head_sources(model, [0, 2])
    rows = [Row(s, unit, cid, pos) for s in range(2) for unit in range(HEADS) for cid, pos in PLACES]
    got = attribute(model, sources, rows, CONTEXTS, batch_size=2)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert {attribution_kind(model, s) for s in sources} == {"head"}
    for row, result in zip(rows, got, strict=True):
        source, h, t = sources[row.source], row.unit, row.position
        ref = reference(eager, source.layer, CONTEXTS[row.context_id])
        a, v, w_o = ref["a"][h, t, :t + 1], ref["v"][:t + 1, h], ref["w_o"][:, h * HEAD_DIM:(h + 1) * HEAD_DIM]
        assert result is not None and result.constant is None and len(result.shares) == t + 1
        torch.testing.assert_close(torch.from_numpy(result.weights), a, rtol=1e-5, atol=1e-6)
        writes = a[:, None] * (v @ w_o.T)  # [positions, d_model]: what each position adds to the head's write
        torch.testing.assert_close(torch.from_numpy(result.shares), writes.norm(dim=-1), rtol=1e-4, atol=1e-5)
        head_write = ref["z"][t, h * HEAD_DIM:(h + 1) * HEAD_DIM] @ w_o.T
        torch.testing.assert_close(writes.sum(0), head_write, rtol=1e-4, atol=1e-5)
        activation = source.activations(ref["z"][None], 1, len(CONTEXTS[row.context_id]))[0, t, h]
        torch.testing.assert_close(head_write.norm(), activation, rtol=1e-4, atol=1e-5)
        assert result.shares.sum() >= activation.item() * (1 - 1e-5)  # norms of the parts: at least the whole's


@pytest.mark.model
def test_a_16_bit_model_passes_the_check_that_its_values_rebuild_z(model_dir: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    sources = head_sources(model, [0, 2])
    rows = [Row(s, unit, cid, pos) for s in range(2) for unit in range(HEADS) for cid, pos in PLACES]
    got = attribute(model, sources, rows, CONTEXTS, batch_size=2)
    assert "featureatlas" not in capsys.readouterr().err
    assert len(got) == len(rows)
    for result in got:
        assert result is not None and result.weights.dtype == np.float32
        assert result.weights.sum() == pytest.approx(1, abs=2e-2)  # a softmax, rounded to bfloat16


@pytest.mark.model
@pytest.mark.parametrize("kind", MODEL_TYPES)
def test_every_family_gets_its_eager_weights_and_at_its_first_token_the_heads_whole_write(kind: str,
                                                                                          tmp_path: Path) -> None:
    """Where each family keeps its value vectors (v_proj, GPT-2's c_attn, GPT-NeoX's query_key_value): at
    position 0 a head attends only to itself, so its one share is the norm of its whole write, its activation."""
    folder = save_tiny_model(kind, tmp_path / kind)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    eager = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    sources, reference_sources = head_sources(model, [1]), head_sources(eager, [1])
    n_heads = sources[0].n_units
    rows = [Row(0, h, cid, pos) for h in range(n_heads) for cid, pos in [*PLACES, (10, 0), (11, 0)]]
    got = attribute(model, sources, rows, CONTEXTS, batch_size=2)
    for cid, ids in CONTEXTS.items():
        seen: list[torch.Tensor] = []
        handle = read_hook(eager.base_model, reference_sources[0].hook, seen.append)
        with torch.no_grad():
            weights = eager(torch.tensor([ids]), output_attentions=True).attentions[1][0]
        handle.remove()
        activations = reference_sources[0].activations(seen[0], 1, len(ids))[0]
        for row, result in zip(rows, got, strict=True):
            if row.context_id != cid:
                continue
            h, t = row.unit, row.position
            assert result is not None, (kind, row)
            torch.testing.assert_close(torch.from_numpy(result.weights), weights[h, t, :t + 1], rtol=1e-5, atol=1e-6)
            if t == 0:
                assert result.shares[0] == pytest.approx(activations[0, h].item(), rel=1e-4, abs=1e-6)


# --- dictionaries on hook_z ----------------------------------------------------------------------------------------

def zsae(folder: Path, seed: int = 1) -> Path:
    """A random top-k SAE on blocks.1.attn.hook_z with non-zero biases, saved as SAELens saves it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(D_SAE, HEADS * HEAD_DIM, generator=g), dim=1)
    result = TrainResult(W_enc=w.T.clone(), b_enc=0.3 * torch.randn(D_SAE, generator=g), W_dec=w,
                         b_dec=0.2 * torch.randn(HEADS * HEAD_DIM, generator=g), k=4, fvu=1.0, l0=4.0,
                         dead_fraction=0.0, steps=0, seconds=0.0)
    return save_saelens_folder(result, folder, hook_name="blocks.1.attn.hook_z", model_name="tiny", context_size=16,
                               prepend_bos=True, dataset_path="corpus")


def variant(dictionary: Dictionary, name: str) -> Dictionary:
    """The dictionary as another encoder: its input normalisation, its architecture, or its decoder rescaling."""
    g = torch.Generator().manual_seed(7)
    t = dictionary.tensors
    if name in ("layer_norm", "constant_norm_rescale"):
        dictionary.normalize = name
    elif name == "rescaled_topk":
        t["W_dec"] = t["W_dec"] * (0.5 + torch.rand(D_SAE, 1, generator=g))
        dictionary.rescale_acts_by_decoder_norm = True
    elif name == "gated":
        dictionary.activation = "gated"
        t.update(b_gate=0.1 * torch.randn(D_SAE, generator=g), b_mag=0.3 * torch.randn(D_SAE, generator=g),
                 r_mag=0.2 * torch.randn(D_SAE, generator=g))
    elif name == "sparsify":
        dictionary.activation = "sparsify_topk"
        t.update({"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"]})
    elif name == "relu":
        dictionary.activation = "relu"
    return dictionary


def pre_activation(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """[d_sae]: the encoder's pre-activation at x, written out here from the formats' own definitions."""
    t = d.tensors
    if d.normalize == "constant_norm_rescale":
        x = x * (d.d_in ** 0.5 / x.norm())
    elif d.normalize == "layer_norm":
        x = (x - x.mean()) / (x.std() + 1e-5)
    if d.subtract_b_dec:
        x = x - t["b_dec"]
    if d.activation == "gated":
        return x @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]
    if d.activation.startswith("sparsify"):
        return x @ t["encoder.weight"].T + t["encoder.bias"]
    h = x @ t["W_enc"] + t["b_enc"]
    return h * t["W_dec"].norm(dim=-1) if d.rescale_acts_by_decoder_norm else h


@pytest.mark.model
@pytest.mark.parametrize("name", ["topk", "relu", "layer_norm", "constant_norm_rescale", "rescaled_topk", "gated",
                                  "sparsify"])
def test_a_hook_z_features_attributions_add_up_to_its_pre_activation(
        model_dir: Path, eager: transformers.PreTrainedModel, tmp_path: Path, name: str) -> None:
    model = load_sdpa(model_dir)
    (dictionary,) = load_dictionaries(zsae(tmp_path / "sae"))
    dictionary = variant(dictionary, name)
    sources = dictionary_sources([("z", dictionary)], model.base_model, "llama", torch.device("cpu"))
    assert attribution_kind(model, sources[0]) == "dictionary"
    rows = [Row(0, f, cid, pos) for f in range(D_SAE) for cid, pos in PLACES]
    got = attribute(model, sources, rows, CONTEXTS, batch_size=2)
    for cid, pos in PLACES:
        x = reference(eager, 1, CONTEXTS[cid])["z"][pos]  # what the dictionary reads at the max token
        pre = pre_activation(dictionary, x)
        encoded = dictionary.encode(x[None])[0]
        firing = encoded != 0
        torch.testing.assert_close(encoded[firing], pre[firing], rtol=1e-5, atol=1e-5)  # the activation, where on
        found = {row.unit: result for row, result in zip(rows, got, strict=True)
                 if (row.context_id, row.position) == (cid, pos)}
        for f in range(D_SAE):
            result = found[f]
            assert result.weights is None and len(result.shares) == pos + 1
            total = torch.tensor(result.shares.sum(dtype="float64") + result.constant, dtype=torch.float32)
            torch.testing.assert_close(total, pre[f], rtol=1e-4, atol=1e-4)


@pytest.mark.model
def test_the_constant_is_what_b_dec_and_b_enc_add(model_dir: Path, tmp_path: Path) -> None:
    """At the BOS token (attending only to itself) the lone position's share is its z's, the rest is the constant."""
    model = load_sdpa(model_dir)
    (dictionary,) = load_dictionaries(zsae(tmp_path / "sae"))
    sources = dictionary_sources([("z", dictionary)], model.base_model, "llama", torch.device("cpu"))
    (result,) = attribute(model, sources, [Row(0, 3, 10, 0)], CONTEXTS)
    t = dictionary.tensors
    assert result.constant == pytest.approx(float(t["b_enc"][3] - t["b_dec"] @ t["W_enc"][:, 3]), rel=1e-5)


def test_other_sources_get_no_attributions(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=50)
    model = transformers.AutoModelForCausalLM.from_config(config)
    (mlp,) = mlp_sources(model.base_model, "llama", [1])
    assert attribution_kind(model, mlp) is None
    assert attribute(model, [mlp], [Row(0, 0, 1, 2)], {1: [0, 1, 2]}) == [None]


# --- the harvest ---------------------------------------------------------------------------------------------------

def harvest_args(model_dir: Path, root: Path, store: Path) -> list[str]:
    """A harvest of the GQA model's heads (layers 0-2) and a hook_z SAE (layer 1), as the command line takes it."""
    sae = root / "sae" if (root / "sae").is_dir() else zsae(root / "sae")
    return ["harvest", "--model", str(model_dir), "--corpus", str(write_corpus(root / "corpus")), "--out", str(store),
            "--device", "cpu", "--dtype", "float32", "--layers", "none", "--heads", "0-2", "--sae", f"z1={sae}",
            "--context-length", "16", "--tokens", "300", "--top-k", "3", "--batch-size", "4", "--compile", "off"]


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    from featureatlas.cli import main

    root = tmp_path_factory.mktemp("harvest")
    assert main(harvest_args(model_dir, root, root / "store.duckdb")) == 0
    return root / "store.duckdb"


def attribution_rows(store: Path) -> list[tuple]:
    con = duckdb.connect(str(store), read_only=True)
    try:
        return con.execute("""SELECT source, layer, unit, context_id, position, kind, weights, shares, constant
                              FROM attributions ORDER BY ALL""").fetchall()
    finally:
        con.close()


@pytest.mark.model
def test_the_store_holds_each_heads_and_features_attributions(harvested: Path,
                                                               eager: transformers.PreTrainedModel) -> None:
    con = duckdb.connect(str(harvested), read_only=True)
    try:
        kinds = con.execute("""SELECT a.source, e.example_kind, count(*) FROM attributions a JOIN examples e
                               ON e.model = a.model AND e.source = a.source AND e.layer = a.layer AND e.unit = a.unit
                               AND e.context_id = a.context_id AND e.max_position = a.position
                               GROUP BY ALL ORDER BY ALL""").fetchall()
        unmatched = con.execute("""SELECT count(*) FROM examples e WHERE (source = 'attn' OR example_kind = 'top')
            AND NOT EXISTS (SELECT 1 FROM attributions a WHERE e.model = a.model AND e.source = a.source AND
            e.layer = a.layer AND e.unit = a.unit AND e.context_id = a.context_id
            AND e.max_position = a.position)""").fetchone()[0]
        features = con.execute("""SELECT e.max_activation, a.shares, a.constant, a.weights, a.kind FROM examples e
            JOIN attributions a USING (model, source, layer, unit, context_id)
            WHERE e.source = 'sae:z1' AND e.example_kind = 'top' AND a.position = e.max_position""").fetchall()
        n_feature_rows = con.execute("SELECT count(*) FROM attributions WHERE source = 'sae:z1'").fetchone()[0]
        heads = con.execute("""SELECT a.layer, a.unit, a.position, a.weights, a.shares, a.constant, c.token_ids
            FROM attributions a JOIN contexts c USING (context_id) WHERE a.source = 'attn'""").fetchall()
    finally:
        con.close()
    # Every head example has one, and every feature's top example (its other examples only where they share one)
    assert {(source, kind) for source, kind, _ in kinds if source == "attn"} == {
        ("attn", "top"), ("attn", "quantile"), ("attn", "random")}
    assert unmatched == 0 and len(features) == n_feature_rows
    assert features
    for activation, shares, constant, weights, kind in features:
        assert kind == "dictionary" and weights is None
        assert math.isclose(math.fsum(shares) + constant, activation, rel_tol=1e-4, abs_tol=1e-4)
    for layer, unit, position, weights, shares, constant, ids in heads[:40]:
        a = reference(eager, layer, ids)["a"][unit, position, :position + 1]
        assert constant is None and len(weights) == len(shares) == position + 1
        torch.testing.assert_close(torch.tensor(weights), a, rtol=1e-4, atol=1e-6)


@pytest.mark.model
def test_shards_merge_into_the_single_runs_attributions(harvested: Path, model_dir: Path, tmp_path: Path) -> None:
    from featureatlas.cli import main

    shards = [tmp_path / f"shard{i}.duckdb" for i in range(2)]
    for i, shard in enumerate(shards):
        assert main([*harvest_args(model_dir, tmp_path, shard), "--shard", f"{i}/2"]) == 0
    assert main(["merge", *map(str, shards), "--out", str(tmp_path / "merged.duckdb")]) == 0
    merged, whole = attribution_rows(tmp_path / "merged.duckdb"), attribution_rows(harvested)
    assert [row[:6] for row in merged] == [row[:6] for row in whole]
    for a, b in zip(merged, whole, strict=True):  # each shard ran its contexts in other batches: float rounding
        for x, y in zip(a[6:], b[6:], strict=True):
            assert x == y if x is None or y is None else x == pytest.approx(y, rel=1e-4, abs=1e-5), (a, b)


@pytest.mark.model
def test_a_harvest_without_heads_runs_the_model_as_before(model_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No switch of attention implementation, no attention weights asked for; with heads, the harvest's own passes
    are untouched too: only the post-pass after them runs in eager attention, and the model is switched back."""
    from featureatlas.harvest.config import HarvestConfig
    from featureatlas.harvest.run import harvest
    from featureatlas.load.models import load_model, resolve_model

    ref = resolve_model(str(model_dir))
    model, tokenizer = load_model(ref, torch.device("cpu"), torch.float32)
    before = model.config._attn_implementation
    assert before != "eager"
    switches: list[str] = []
    original = transformers.PreTrainedModel.set_attn_implementation
    monkeypatch.setattr(transformers.PreTrainedModel, "set_attn_implementation",
                        lambda self, impl, **kw: (switches.append(impl), original(self, impl, **kw))[1])
    calls: list[tuple[str, object]] = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
            (m.config._attn_implementation, kwargs.get("output_attentions"))), with_kwargs=True)
    corpus = write_corpus(tmp_path / "corpus")
    common = {"model": str(model_dir), "corpus": corpus, "context_length": 16, "tokens": 200, "top_k": 2,
              "compile": "off", "batch_size": 4, "device": "cpu", "dtype": "float32", "progress": False}
    harvest(HarvestConfig(out=tmp_path / "plain.duckdb", layers="1", **common), (model, tokenizer, ref))
    assert switches == [] and calls and all(call == (before, None) for call in calls)
    con = duckdb.connect(str(tmp_path / "plain.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM attributions").fetchone()[0] == 0
    con.close()

    calls.clear()
    harvest(HarvestConfig(out=tmp_path / "heads.duckdb", layers="none", heads="1", **common), (model, tokenizer, ref))
    assert switches == ["eager", before] and model.config._attn_implementation == before
    implementations = [impl for impl, _ in calls]
    first_eager = implementations.index("eager")
    assert set(implementations[:first_eager]) == {before} and set(implementations[first_eager:]) == {"eager"}
    assert all(flag is None for _, flag in calls)


# --- the site, in a browser ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(harvested: Path) -> Path:
    from featureatlas.build.site import build_site

    out = harvested.parent / "site"
    build_site(harvested, out, workers=1, progress=False)
    return out


def open_unit(page: object, site: Path, folder: str, unit: int) -> None:
    page.goto(next(site.glob(f"*/{folder}/unit.html")).as_uri() + f"#{unit}")  # type: ignore[attr-defined]
    page.locator("#top .ex").first.wait_for()  # type: ignore[attr-defined]


def tooltip_of(page: object, token: object) -> str:
    token.hover()  # type: ignore[attr-defined]
    tip = page.locator("#tip")  # type: ignore[attr-defined]
    tip.wait_for(state="visible", timeout=10_000)
    return tip.inner_text()


@pytest.mark.model
@pytest.mark.browser
def test_a_heads_page_shows_where_it_looked_with_tooltips(page: object, site: Path, harvested: Path) -> None:
    pytest.importorskip("axe_playwright_python")
    from axe_playwright_python.sync_playwright import Axe

    open_unit(page, site, "attn/1", 2)
    first = page.locator("#top .ex").first  # type: ignore[attr-defined]
    disclosure = first.locator("details.attn")
    assert disclosure.locator("summary").inner_text() == "Where the head looked from the max token"
    assert disclosure.locator(".ctx").count() == 0  # drawn when first opened
    disclosure.locator("summary").click()
    rows = disclosure.locator(".ctx")
    expect(rows).to_have_count(2)  # drawn on the disclosure's toggle event, a task after the click
    assert disclosure.locator(".attn-label").all_text_contents() == ["Attention weight", "Share of the write"]
    tokens = rows.nth(0).locator("b")
    assert tokens.last.get_attribute("class").split().count("m") == 1  # the max token, marked, ends the row
    con = duckdb.connect(str(harvested), read_only=True)
    position, lo, weights, shares = con.execute("""
        SELECT e.max_position, greatest(e.max_position - 32, 0), a.weights, a.shares FROM examples e
        JOIN attributions a USING (model, source, layer, unit, context_id)
        WHERE e.source = 'attn' AND e.layer = 1 AND e.unit = 2 AND e.example_kind = 'top' AND e.rank = 1
          AND a.position = e.max_position""").fetchone()
    con.close()
    lo = 0 if lo <= 1 else lo
    assert tokens.count() == position + 1 - lo
    strongest = max(range(lo, position + 1), key=lambda s: weights[s])
    text = tooltip_of(page, tokens.nth(strongest - lo))
    match = re.search(r"attention (\S+) \u00b7 share of the write (\S+)", text)
    assert match, text
    assert float(match.group(1)) == pytest.approx(weights[strongest], rel=1e-2)  # three significant digits
    assert float(match.group(2)) == pytest.approx(shares[strongest], rel=1e-2)  # three significant digits
    assert "a9" in tokens.nth(strongest - lo).get_attribute("class").split()  # the darkest shade
    with page.expect_download() as download:  # type: ignore[attr-defined]
        page.get_by_role("link", name=re.compile("Download this unit")).click()  # type: ignore[attr-defined]
    attribution = json.loads(Path(download.value.path()).read_text())["examples"][0]["attribution"]
    assert attribution["kind"] == "attention" and len(attribution["weights"]) == position + 1 - lo
    for got, want in ((attribution["weights"], weights), (attribution["shares_of_the_write"], shares)):
        want = np.asarray(want[lo:position + 1])  # 16-bit codes: within a 32,767th of the largest
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3 * float(np.abs(want).max()))
    assert page.problems == [] and page.evaluate("window.__problems") == []  # type: ignore[attr-defined]
    violations = [f"{v['id']} ({v['impact']}): {v['nodes'][0]['target']}" for v in Axe().run(page).response[
        "violations"] if v["impact"] in ("serious", "critical")]
    assert violations == []
    page.problems.clear()  # type: ignore[attr-defined]  # axe's own reads of the stylesheets, which file:// refuses

    open_unit(page, site, "sae-z1/1", int(first_firing_feature(harvested)))
    disclosure = page.locator("#top .ex details.attn").first  # type: ignore[attr-defined]
    disclosure.locator("summary").click()
    expect(disclosure.locator(".attn-label")).to_have_text(["Direct attribution"])
    text = tooltip_of(page, disclosure.locator(".ctx b").last)
    assert re.search(r"attribution [+-]?\S+ \u00b7 -?[\d.e-]+% of the pre-activation", text), text
    assert page.problems == [] and page.evaluate("window.__problems") == []  # type: ignore[attr-defined]


def first_firing_feature(store: Path) -> int:
    con = duckdb.connect(str(store), read_only=True)
    try:
        return con.execute("SELECT min(unit) FROM attributions WHERE source = 'sae:z1'").fetchone()[0]
    finally:
        con.close()
