"""Ablation effects checked against plain torch hooks written here, one context at a time: a neuron zeroed before
the MLP output projection, a residual dimension zeroed in the block's output, a feature's activation x decoder row
subtracted, a head's slice of z zeroed, each at one position only; then the same numbers from the store a
`harvest --ablation-effects` writes, its merge, the served endpoint, the notebook and the static site."""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import transformers

from featureatlas.errors import UsageError
from featureatlas.harvest.ablation import ablate, ablation_effects
from featureatlas.harvest.heads import head_sources
from featureatlas.harvest.sources import dictionary_sources, mlp_sources, resid_sources
from featureatlas.load.dictionaries import load_dictionaries

from helpers.tiny_models import HIDDEN, one_thread, saelens_sae, save_tiny_model

pytestmark = pytest.mark.model

torch_on_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


CONTEXTS = [[0, 5, 9, 14, 3, 22, 7, 40, 41], [0, 17, 2, 99, 150, 6, 8, 23, 11], [0, 64, 12, 12, 201, 7]]


def effects_by_hand(model: transformers.PreTrainedModel, ids: list[int], module: torch.nn.Module,
                    edit: Callable[[torch.Tensor], torch.Tensor], position: int, pre: bool) -> np.ndarray:
    """log p of each token after `position`, with edit applied to the module's input (pre) or output, minus
    without, for one context."""
    def run() -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    clean = run()
    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: (edit(args[0].clone()), *args[1:]))
    else:
        def on_output(m: torch.nn.Module, args: tuple, out: object) -> object:
            return (edit(out[0].clone()), *out[1:]) if isinstance(out, tuple) else edit(out.clone())
        handle = module.register_forward_hook(on_output)
    try:
        ablated = run()
    finally:
        handle.remove()
    return (ablated - clean)[position:].numpy()


def rows_for(n_units: int) -> list[tuple[int, list[int], int]]:
    """Several units, positions and contexts of two lengths: batched together, shared clean passes."""
    return [(3 % n_units, CONTEXTS[0], 2), (5 % n_units, CONTEXTS[1], 4), (1, CONTEXTS[2], 1),
            (3 % n_units, CONTEXTS[1], 7), (0, CONTEXTS[0], 8), (1, CONTEXTS[0], 5)]


def check(model: transformers.PreTrainedModel, source: object, module_of: Callable[[], torch.nn.Module],
          edit_for: Callable[[int, int], Callable[[torch.Tensor], torch.Tensor]], pre: bool,
          rows: list[tuple[int, list[int], int]] | None = None) -> None:
    rows = rows or rows_for(source.n_units)
    got = ablation_effects(model, source, rows, batch_size=2)
    moved = 0.0
    for (unit, ids, position), effects in zip(rows, got, strict=True):
        expected = effects_by_hand(model, ids, module_of(), edit_for(unit, position), position, pre)
        assert effects.dtype == np.float32 and effects.shape == (len(ids) - position - 1,)
        np.testing.assert_allclose(effects, expected, rtol=1e-4, atol=1e-4)
        moved = max(moved, float(np.abs(expected).max(initial=0)))
    assert moved > 1e-3  # the ablations changed something


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ablation")
    models = {t: transformers.AutoModelForCausalLM.from_pretrained(save_tiny_model(t, root / t)).eval()
              for t in ("llama", "gpt2", "opt")}
    return {"models": models, "sae": saelens_sae(root / "sae", HIDDEN, "blocks.1.hook_resid_post")}


def zero_at(position: int, index: object) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # OPT's MLP sees [tokens, width]
            x[position, index] = 0
        else:
            x[0, position, index] = 0
        return x
    return edit


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_a_neuron_is_zeroed_before_the_output_projection(tiny, model_type: str) -> None:
    model = tiny["models"][model_type]
    (source,) = mlp_sources(model.base_model, model_type, [1])
    down = {"llama": lambda: model.model.layers[1].mlp.down_proj, "gpt2": lambda: model.transformer.h[1].mlp.c_proj,
            "opt": lambda: model.model.decoder.layers[1].fc2}[model_type]
    check(model, source, down, lambda unit, p: zero_at(p, unit), pre=True)


def test_a_residual_dimension_is_zeroed_in_the_block_output(tiny) -> None:
    model = tiny["models"]["llama"]
    (source,) = resid_sources(model.base_model, "llama", [0], HIDDEN)
    check(model, source, lambda: model.model.layers[0], lambda unit, p: zero_at(p, unit), pre=False)


def test_a_head_has_its_slice_of_z_zeroed(tiny) -> None:
    model = tiny["models"]["llama"]
    (source,) = head_sources(model, [2])
    width = HIDDEN // source.n_units
    check(model, source, lambda: model.model.layers[2].self_attn.o_proj,
          lambda unit, p: zero_at(p, slice(unit * width, (unit + 1) * width)), pre=True)


def test_a_feature_has_activation_times_decoder_row_subtracted(tiny) -> None:
    model = tiny["models"]["llama"]
    (source,) = dictionary_sources([("res1", d) for d in load_dictionaries(tiny["sae"])], model.base_model, "llama",
                                   torch.device("cpu"))
    w_enc, b_enc, w_dec, b_dec = (source.dictionary.tensors[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec"))

    def edit_for(unit: int, position: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def edit(x: torch.Tensor) -> torch.Tensor:  # a top-4 SAE by hand; the reconstruction error is kept
            pre = torch.relu((x[0, position] - b_dec) @ w_enc + b_enc)
            top = pre.topk(4)
            act = float(top.values[top.indices == unit].sum())
            x[0, position] -= act * w_dec[unit]
            return x
        return edit
    rows = [(0, CONTEXTS[0], 2), (28, CONTEXTS[0], 3), (9, CONTEXTS[1], 4), (16, CONTEXTS[2], 2),
            (15, CONTEXTS[1], 1), (3, CONTEXTS[0], 5)]  # the last does not fire there: no effect
    acts = [float(source.dictionary.encode(hidden_at(model, ids, 2, p))[u]) for u, ids, p in rows]
    assert all(a > 0 for a in acts[:-1]) and acts[-1] == 0, "the features no longer fire there; pick others"
    check(model, source, lambda: model.model.layers[1], edit_for, pre=False, rows=rows)
    assert not ablation_effects(model, source, rows[-1:])[0].any()


def hidden_at(model: transformers.PreTrainedModel, ids: list[int], index: int, position: int) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[index][0, position]


def test_ablate_one_context_and_bad_requests(tiny) -> None:
    model = tiny["models"]["llama"]
    (source,) = resid_sources(model.base_model, "llama", [0], HIDDEN)
    one = ablate(model, source, 4, CONTEXTS[0], 3)
    assert one.position == 3 and one.token_ids == CONTEXTS[0] and len(one.effects) == len(CONTEXTS[0]) - 4
    np.testing.assert_allclose(one.effects, effects_by_hand(model, CONTEXTS[0], model.model.layers[0],
                                                            zero_at(3, 4), 3, pre=False), rtol=1e-4, atol=1e-4)
    assert len(ablate(model, source, 4, CONTEXTS[0], len(CONTEXTS[0]) - 1).effects) == 0  # nothing follows
    with pytest.raises(UsageError, match="units 0-31"):
        ablate(model, source, 32, CONTEXTS[0], 1)
    with pytest.raises(UsageError, match="positions 0-8"):
        ablate(model, source, 1, CONTEXTS[0], 9)


# ---- The harvest's post-pass, the store, merge, serve, notebook and site ----

HARVEST = ["--device", "cpu", "--dtype", "float32", "--layers", "0-1", "--resid", "1", "--context-length", "16",
           "--top-k", "3", "--batch-size", "5", "--intervals", "2", "--compile", "off", "--tokens", "400"]


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from featureatlas.cli import main

    from helpers.tiny_models import write_corpus

    root = tmp_path_factory.mktemp("ablation-store")
    model, corpus = save_tiny_model("llama", root / "model"), write_corpus(root / "corpus")
    sae = saelens_sae(root / "sae", HIDDEN, "blocks.1.hook_resid_post")
    common = ["--model", str(model), "--corpus", str(corpus), "--sae", f"res1={sae}", *HARVEST]
    store = root / "store.duckdb"
    assert main(["harvest", "--out", str(store), *common, "--heads", "2", "--ablation-effects"]) == 0
    plain = root / "plain.duckdb"  # the same examples (heads aside), without the post-pass
    assert main(["harvest", "--out", str(plain), *common]) == 0
    return {"root": root, "store": store, "plain": plain, "model": model, "sae": sae, "common": common}


def stored(store: Path) -> dict[tuple, tuple[int, np.ndarray]]:
    """(source, layer, unit, context_id) -> (position, effects), from the `ablations` view."""
    with duckdb.connect(str(store), read_only=True) as con:
        rows = con.execute("SELECT source, layer, unit, context_id, position, effects FROM ablations").fetchall()
    return {(s, la, u, c): (p, np.array(e, np.float32)) for s, la, u, c, p, e in rows}


def test_every_top_example_has_its_effects_stored(harvested) -> None:
    found = stored(harvested["store"])
    with duckdb.connect(str(harvested["store"]), read_only=True) as con:
        tops = con.execute("""SELECT e.source, e.layer, e.unit, e.context_id, e.max_position, c.token_ids
                              FROM examples e JOIN contexts c USING (context_id)
                              WHERE e.example_kind = 'top'""").fetchall()
    assert {s for s, *_ in tops} == {"mlp", "resid", "attn", "sae:res1"} and len(found) == len(tops)
    model = transformers.AutoModelForCausalLM.from_pretrained(harvested["model"]).eval()
    built = mlp_sources(model.base_model, "llama", [0, 1]) + resid_sources(model.base_model, "llama", [1], HIDDEN) \
        + head_sources(model, [2]) + dictionary_sources([("res1", d) for d in load_dictionaries(harvested["sae"])],
                                                        model.base_model, "llama", torch.device("cpu"))
    for source in built:  # batched otherwise than the harvest batched them
        rows = [(u, ids, p) for s, la, u, c, p, ids in tops if (s, la) == (source.name, source.layer)]
        keys = [(s, la, u, c) for s, la, u, c, p, ids in tops if (s, la) == (source.name, source.layer)]
        for key, (_, ids, position), expected in zip(keys, rows, ablation_effects(model, source, rows, 3),
                                                     strict=True):
            got_position, effects = found[key]
            assert got_position == position and len(effects) == len(ids) - position - 1
            np.testing.assert_allclose(effects, expected, rtol=1e-4, atol=1e-4)
    assert max(float(np.abs(e).max(initial=0)) for _, e in found.values()) > 1e-3
    assert stored(harvested["plain"]) == {}  # off by default: the table is there, empty


def test_merged_shards_keep_the_effects_of_the_examples_they_keep(harvested) -> None:
    from featureatlas.cli import main

    root, common = harvested["root"], harvested["common"]
    shards = [root / f"shard{i}.duckdb" for i in range(2)]
    for i, shard in enumerate(shards):
        assert main(["harvest", "--out", str(shard), *common, "--heads", "2", "--ablation-effects", "--shard",
                     f"{i}/2"]) == 0
    merged = root / "merged.duckdb"
    assert main(["merge", *map(str, shards), "--out", str(merged)]) == 0
    whole, parts = stored(harvested["store"]), stored(merged)
    assert parts.keys() == whole.keys()  # the merge's top examples are the single run's
    for key, (position, effects) in whole.items():
        assert parts[key][0] == position
        np.testing.assert_allclose(parts[key][1], effects, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def served(harvested) -> Iterator[dict]:
    from featureatlas.build.site import build_site
    from featureatlas.harvest.probe import load_prober
    from featureatlas.serve.server import make_server

    site = harvested["root"] / "plain-site"  # a site without stored effects: the page asks the server
    build_site(harvested["plain"], site, workers=1, progress=False)
    server = make_server(site, port=0, prober=load_prober(store=harvested["plain"], device="cpu"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"base": f"http://127.0.0.1:{server.server_address[1]}/", "site": site}
    server.shutdown()
    server.server_close()


def post(base: str, endpoint: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(base + endpoint, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_server_computes_what_the_harvest_stores(harvested, served) -> None:
    whole = {k: v for k, v in stored(harvested["store"]).items() if k[0] != "attn"}  # the plain store's examples
    for (source, layer, unit, context_id), (position, effects) in list(whole.items())[::7]:
        code, answer = post(served["base"], "api/ablate", {"source": source, "layer": layer, "unit": unit,
                                                           "context_id": context_id, "position": position})
        assert code == 200 and answer["position"] == position
        np.testing.assert_allclose(np.array(answer["effects"], np.float32), effects, rtol=1e-4, atol=1e-4)
    with urllib.request.urlopen(served["base"] + "api/probe", timeout=30) as response:
        assert json.loads(response.read())["ablate"] is True


@pytest.mark.parametrize("change,message", [
    ({"context_id": 10**9}, "no example of"),
    ({"context_id": -1}, "context_id"),
    ({"context_id": "3"}, "context_id"),
    ({"position": 16}, "positions 0-15"),
    ({"position": True}, "position"),
    ({"unit": 10**6}, "units 0-"),
    ({"layer": 7}, "no mlp layer 7"),
])
def test_bad_ablation_requests_get_one_line(harvested, served, change: dict, message: str) -> None:
    (source, layer, unit, context_id), (position, _) = next(
        (k, v) for k, v in stored(harvested["store"]).items() if k[0] == "mlp")
    request = {"source": source, "layer": layer, "unit": unit, "context_id": context_id, "position": position}
    code, answer = post(served["base"], "api/ablate", {**request, **change})
    assert code == 400 and message in answer["error"] and "\n" not in answer["error"]


def test_the_notebook_ablates_stored_contexts_and_texts(harvested) -> None:
    from featureatlas.notebook import open_atlas

    atlas = open_atlas(harvested["plain"], device="cpu")  # its examples are those of the store with effects
    (source, layer, unit, context_id), (position, effects) = next(
        (k, v) for k, v in stored(harvested["store"]).items() if k[0] == "sae:res1")
    result = atlas.ablate(f"{source}/{layer}/{unit}", context_id)  # the top example's own max by default
    assert result.position == position and len(result.tokens) == position + 1 + len(effects)
    np.testing.assert_allclose(result.effects, effects, rtol=1e-4, atol=1e-4)
    assert "removed at position" in result._repr_html_()
    text = atlas.ablate("mlp/1/3", text="The quick brown fox jumps over the lazy dog.", position=2)
    assert text.position == 2 and len(text.effects) == len(text.tokens) - 3
    with pytest.raises(UsageError, match="context_id=N"):
        atlas.ablate("mlp/1/3")


@pytest.fixture(scope="module")
def site(harvested) -> Path:
    from featureatlas.build.site import build_site

    built = harvested["root"] / "site"
    build_site(harvested["store"], built, workers=1, progress=False)
    return built


def test_the_site_shows_stored_effects_of_the_window(harvested, site) -> None:
    from featureatlas.build.numbers import decode_activations
    from featureatlas.build.shards import read_js

    found = stored(harvested["store"])
    checked = 0
    for path in site.glob("*/*/*/d/*.js"):
        _, shard = read_js(path.read_text())
        folder = path.parent.parent.relative_to(site).parts
        for row in shard["units"]:
            tops = row["ex"].get("top", [])
            assert len(row.get("ab", tops)) == len(tops)
            for ex, text in zip(tops, row.get("ab", [None] * len(tops)), strict=True):
                ctx = shard["ctx"][ex[0]]
                source = {"sae-res1": "sae:res1"}.get(folder[1], folder[1])
                position, effects = found[(source, int(folder[2]), row["u"], ctx[5])]
                assert text is not None and ex[2] == position
                shown = min(8, len(effects))  # the top window's tokens after the max (build/worker.py)
                np.testing.assert_allclose(decode_activations(text), effects[:shown], rtol=5e-3, atol=1e-6)
                checked += 1
    assert checked > 20


@pytest.mark.browser
def test_hovering_a_token_after_the_max_shows_the_effect(harvested, site, served, page) -> None:
    """From the shard on a static page (file://); asked of the server on a served page whose store has none."""
    from helpers.browser import assert_clean, expect

    with duckdb.connect(str(harvested["store"]), read_only=True) as con:
        unit, context_id = con.execute("""SELECT unit, context_id FROM examples WHERE source = 'mlp' AND layer = 1
            AND example_kind = 'top' AND rank = 1 AND max_position < len(activations) - 1 ORDER BY unit""").fetchone()
    first = float(stored(harvested["store"])[("mlp", 1, unit, context_id)][1][0])
    folder = next(site.glob("*/mlp/1")).relative_to(site).as_posix()
    line = "ablating the max token changes log p(this token) by "
    for url in ((site / folder / "unit.html").as_uri() + f"#{unit}", f"{served['base']}{folder}/unit.html#{unit}"):
        page.goto(url)
        after = page.locator("#top .ex").first.locator(".ctx > b.m + b")
        after.hover()
        expect(page.locator("#tip")).to_contain_text(line)
        shown = float(page.locator("#tip").inner_text().split(line)[1].split()[0])
        assert shown == pytest.approx(first, rel=1e-2, abs=1e-5)
        if url.startswith("file:"):  # the page's JSON download carries them too
            with page.expect_download() as download:
                page.get_by_role("link", name=re.compile("Download this unit")).click()
            data = json.loads(Path(download.value.path()).read_text())
            assert data["examples"][0]["ablation_effects"][0] == pytest.approx(first, rel=1e-2, abs=1e-5)
        page.locator("#top .ex").first.locator(".ctx > b.m").hover()  # the max itself: no such line
        expect(page.locator("#tip")).not_to_contain_text(line)
    buttons = page.get_by_role("button", name="Ablation effects")  # served: the other examples offer it
    assert buttons.count() >= 1
    buttons.first.click()
    expect(page.get_by_text("ablation effects: hover a token after the max")).to_have_count(2)
    assert_clean(page)


def test_a_server_without_a_store_says_so(harvested) -> None:
    from dataclasses import replace

    from featureatlas.harvest.probe import load_prober
    from featureatlas.serve.server import ablate as answer

    prober = replace(load_prober(store=harvested["plain"], device="cpu"), store=None)  # as `serve --model` has it
    with pytest.raises(ValueError, match="no store to read contexts from"):
        answer(prober, {"source": "mlp", "layer": 1, "unit": 0, "context_id": 0, "position": 1})


def test_on_the_embedded_model() -> None:
    """SmolLM2-135M (its converted weights, as harvest loads them): a neuron and a residual dimension, by hand."""
    from featureatlas.load.models import EMBEDDED_MODEL, load_model, resolve_model

    model, tokenizer = load_model(resolve_model(EMBEDDED_MODEL), torch.device("cpu"), torch.float32)
    ids = [tokenizer.bos_token_id] + tokenizer("To be, or not to be, that is the question",
                                               add_special_tokens=False)["input_ids"]
    (neurons,) = mlp_sources(model.base_model, model.config.model_type, [5])
    (dimensions,) = resid_sources(model.base_model, model.config.model_type, [20], model.config.hidden_size)
    for source, module, pre, rows in ((neurons, model.model.layers[5].mlp.down_proj, True, [(100, ids, 4),
                                                                                             (1000, ids, 7)]),
                                      (dimensions, model.model.layers[20], False, [(62, ids, 3), (300, ids, 8)])):
        for (unit, _, position), effects in zip(rows, ablation_effects(model, source, rows), strict=True):
            expected = effects_by_hand(model, ids, module, zero_at(position, unit), position, pre)
            np.testing.assert_allclose(effects, expected, rtol=1e-3, atol=1e-4)
            assert np.abs(expected).max() > 0
