"""How units relate, end to end: co-occurrence counted during a harvest equals a brute-force count over the
dictionary's activations on counted tokens (and survives a checkpoint and resume), cross-dictionary neighbours
equal a brute-force cosine ranking, every unit's data shard carries the `neighbours` view, and in a browser the
"Similar units" panel opens the right units and the map link rings the unit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from featureatlas.build.shards import read_js
from featureatlas.cli import main
from featureatlas.harvest import cooccurrence
from featureatlas.harvest.contexts import iter_batches, iter_contexts
from featureatlas.load.corpus import iter_documents
from featureatlas.load.dictionaries import load_dictionaries
from featureatlas.store.schema import open_store_for_update

from helpers.reference import nearest_by_jaccard
from helpers.stores import query
from helpers.tiny_models import HIDDEN, saelens_sae, save_tiny_model, write_corpus

pytestmark = pytest.mark.model

K, CONTEXT_LENGTH, BATCH_SIZE, TOKENS = 10, 16, 5, 500
HOSTILE = '<img src=x onerror=alert(1)> "co-fires" & more'
EXPLAINED = ("sae:a", 0, 7)  # a unit given an explanation, which its own layer's neighbour lists carry
# The dictionaries: name -> (hook, width). a and b read the residual stream (decoder rows HIDDEN wide: compared
# across), m the MLP's hidden layer (48 wide: in no other dictionary's list).
DICTIONARIES = {"a": ("blocks.0.hook_resid_post", HIDDEN), "b": ("blocks.1.hook_resid_post", HIDDEN),
                "m": ("blocks.1.mlp.hook_post", 48)}


def harvest_argv(root: Path, out: Path, *extra: str) -> list[str]:
    argv = ["harvest", "--model", str(root / "model"), "--corpus", str(root / "corpus"), "--out", str(out),
            "--device", "cpu", "--dtype", "float32", "--layers", "1", "--context-length", str(CONTEXT_LENGTH),
            "--top-k", "3", "--batch-size", str(BATCH_SIZE), "--compile", "off", "--tokens", str(TOKENS)]
    for name in DICTIONARIES:
        argv += ["--sae", f"{name}={root / name}"]
    return argv + list(extra)


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama, three dictionaries and a store harvested from them with --neighbours-across."""
    root = tmp_path_factory.mktemp("relations")
    save_tiny_model("llama", root / "model")
    write_corpus(root / "corpus")
    for seed, (name, (hook, width)) in enumerate(DICTIONARIES.items(), start=1):
        saelens_sae(root / name, width, hook, seed=seed)
    assert main(harvest_argv(root, root / "store.duckdb", "--neighbours-across")) == 0
    return root


def stored_lists(store: Path, source: str, kind: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, K] other units and scores of one kind of neighbour, -1 and 0 where a unit has fewer."""
    index, score = np.full((n, K), -1), np.zeros((n, K))
    for unit, rank, other, value in query(store, """SELECT unit, rank, other_unit, score FROM neighbours
                                                   WHERE source = ? AND kind = ?""", [source, kind]):
        index[unit, rank - 1], score[unit, rank - 1] = other, value
    return index, score


# --- co-occurrence ------------------------------------------------------------------------------------------------

def dictionary_firing(root: Path) -> dict[str, np.ndarray]:
    """Each dictionary's [counted tokens, features] firing (activation > 0), from a plain transformers forward of
    the harvest's batches: BOS and padding left out."""
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model", torch_dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "model")
    dictionaries = {name: load_dictionaries(root / name)[0] for name in DICTIONARIES}
    mlp_hidden: list[torch.Tensor] = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: mlp_hidden.append(a[0]))
    fired: dict[str, list[np.ndarray]] = {name: [] for name in DICTIONARIES}
    contexts = iter_contexts(iter_documents(root / "corpus"), tokenizer, CONTEXT_LENGTH, TOKENS, lambda d: None)
    try:
        for batch, _ in iter_batches(contexts, BATCH_SIZE, True, tokenizer.pad_token_id):
            positions = torch.arange(batch.input_ids.shape[1])
            real = positions[None, :] < batch.lengths[:, None]
            counted = (real & (positions[None, :] >= 1)).numpy()  # BOS at 0
            mlp_hidden.clear()
            with torch.inference_mode():
                hidden = model.model(input_ids=batch.input_ids, attention_mask=real.long() if batch.padded else None,
                                     use_cache=False, output_hidden_states=True).hidden_states
            inputs = {"a": hidden[1], "b": hidden[2], "m": mlp_hidden[0]}  # hidden[L + 1]: block L's output
            for name, dictionary in dictionaries.items():
                acts = dictionary.encode(inputs[name]).float().numpy()
                fired[name].append((acts > 0)[counted])
    finally:
        handle.remove()
    return {name: np.concatenate(parts) for name, parts in fired.items()}


def test_cooccurrence_counted_in_the_harvest_is_the_brute_force_count(harvested: Path) -> None:
    store = harvested / "store.duckdb"
    firing = dictionary_firing(harvested)
    n_tokens = query(store, "SELECT n_tokens FROM runs")[0][0]
    for name, fired in firing.items():
        assert fired.shape == (n_tokens, 40) and fired.sum(1).max() <= 4  # top-4 dictionaries, counted tokens only
        source = f"sae:{name}"
        stored_firing = dict(query(store, "SELECT unit, n_firing FROM statistics WHERE source = ?", [source]))
        assert [stored_firing[u] for u in range(40)] == fired.sum(0).tolist()
        index, score = stored_lists(store, source, "cooccurrence", 40)
        want_index, want_score = nearest_by_jaccard(fired, K)
        assert (index >= 0).sum() > 100  # the lists are not all empty
        assert index.tolist() == want_index.tolist()
        np.testing.assert_allclose(score, want_score, rtol=1e-6)
    settings = json.loads(query(store, "SELECT settings FROM runs")[0][0])
    assert settings["cooccurrence"] is True
    assert sorted(map(tuple, settings["cooccurrence_complete"])) == [("sae:a", 0, True), ("sae:b", 1, True),
                                                                   ("sae:m", 1, True)]
    assert query(store, "SELECT count(*) FROM neighbours WHERE source = 'mlp' AND kind = 'cooccurrence'") == [(0,)]


def test_without_the_setting_nothing_is_counted(harvested: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.duckdb"
    assert main(harvest_argv(harvested, out, "--cooccurrence", "off")) == 0
    assert query(out, "SELECT DISTINCT kind FROM neighbours ORDER BY kind") == [("decoder",), ("encoder",),
                                                                               ("output",)]
    assert "cooccurrence_complete" not in json.loads(query(out, "SELECT settings FROM runs")[0][0])


def test_a_resumed_harvest_counts_as_an_uninterrupted_one(harvested: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tiny buffer and pair budget, so a checkpoint holds buffered pairs and the rarest were dropped."""
    monkeypatch.setattr(cooccurrence, "FLUSH", 7)
    monkeypatch.setattr(cooccurrence, "MAX_PAIRS", 60)
    whole, out = tmp_path / "whole.duckdb", tmp_path / "s.duckdb"
    assert main(harvest_argv(harvested, whole)) == 0
    from featureatlas.harvest import run as run_module

    def fail(*args: object) -> None:
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "_write_contexts", fail)
        with pytest.raises(RuntimeError):
            main(harvest_argv(harvested, out, "--checkpoint-every", "150"))
    assert (tmp_path / "s.duckdb.checkpoint").is_file() and not out.exists()
    assert main(harvest_argv(harvested, out, "--checkpoint-every", "150", "--resume")) == 0
    cooccurring = "SELECT * FROM neighbours WHERE kind = 'cooccurrence' ORDER BY ALL"
    assert query(out, cooccurring) == query(whole, cooccurring) and len(query(whole, cooccurring)) > 0
    settings = json.loads(query(out, "SELECT settings FROM runs")[0][0])
    assert [complete for _, _, complete in settings["cooccurrence_complete"]] == [False, False, False]
    assert settings == json.loads(query(whole, "SELECT settings FROM runs")[0][0])


def test_a_tampered_checkpoint_is_refused(harvested: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from featureatlas.harvest import run as run_module

    out = tmp_path / "s.duckdb"
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "_write_contexts", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
        with pytest.raises(RuntimeError):
            main(harvest_argv(harvested, out, "--checkpoint-every", "150"))
    path = tmp_path / "s.duckdb.checkpoint"
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    key = next(k for k in tensors if k.endswith("cooccurrence.pending"))  # a small run's pairs are all buffered
    assert len(tensors[key]) > 0
    tensors[key] = torch.zeros_like(tensors[key])  # the pair (0, 0): a feature with itself
    save_file(tensors, str(path), metadata=metadata)
    assert main(harvest_argv(harvested, out, "--checkpoint-every", "150", "--resume")) == 2
    assert "co-occurrence pending are not pairs i < j" in capsys.readouterr().err


# --- neighbours across dictionaries -------------------------------------------------------------------------------

def brute_force_cosine(vectors: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    a = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    b = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    sims = a @ b.T
    index = np.array([np.lexsort((np.arange(len(row)), -row))[:k] for row in sims])
    return index, np.take_along_axis(sims, index, axis=1)


def test_neighbours_across_dictionaries_of_the_same_width(harvested: Path) -> None:
    store = harvested / "store.duckdb"
    decoders = {name: load_dictionaries(harvested / name)[0].decoder.double().numpy() for name in DICTIONARIES}
    for name, other, other_layer in (("a", "b", 1), ("b", "a", 0)):
        index, score = stored_lists(store, f"sae:{name}", "decoder_across", 40)
        want_index, want_score = brute_force_cosine(decoders[name], decoders[other], K)
        assert index.tolist() == want_index.tolist()
        np.testing.assert_allclose(score, want_score, rtol=1e-5, atol=1e-6)
        assert query(store, """SELECT DISTINCT other_source, other_layer FROM neighbours
                              WHERE source = ? AND kind = 'decoder_across'""", [f"sae:{name}"]) == [
            (f"sae:{other}", other_layer)]
    # m's decoder rows are 48 wide, not the residual stream's 32: it has no list, and is in none
    assert query(store, """SELECT count(*) FROM neighbours WHERE kind = 'decoder_across'
                          AND (source = 'sae:m' OR other_source = 'sae:m')""") == [(0,)]


# --- the site -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(harvested: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The harvested store, one unit explained (hostile text), built into a site."""
    from featureatlas.build.site import build_site

    root = tmp_path_factory.mktemp("relations-site")
    store = shutil.copyfile(harvested / "store.duckdb", root / "store.duckdb")
    con = open_store_for_update(store)
    try:
        con.execute("INSERT INTO t_explanations VALUES ('model', ?, ?, ?, ?, 0.8, 'detection', 'me', 'f', now())",
                    [*EXPLAINED, HOSTILE])
    finally:
        con.close()
    build_site(store, root / "site", workers=1, progress=False)
    return root / "site"


def layer_folder(site: Path, source: str, layer: int) -> Path:
    return site / "model" / source.replace(":", "-") / str(layer)


def shard_neighbours(site: Path, source: str, layer: int) -> dict[tuple, float]:
    """(unit, kind, rank, other source, other layer, other unit) -> score of every neighbour the layer's data
    shards list, each page link checked: "" for this layer, else the other layer's unit page, relative."""
    folder, found = layer_folder(site, source, layer), {}
    for path in sorted((folder / "d").glob("*.js")):
        _, shard = read_js(path.read_text())
        for unit in shard["units"]:
            for kind, listed in unit.get("nb", {}).items():
                for rank, (page, other, score, *explanation) in enumerate(listed, start=1):
                    href, other_source, other_layer, noun = shard["nbp"][page]
                    here = (other_source, other_layer) == (source, layer)
                    assert href == "" if here else (folder / href).resolve() == (
                        layer_folder(site, other_source, other_layer) / "unit.html").resolve()
                    assert noun == ("Neuron" if other_source == "mlp" else "Feature")
                    # only a unit of this layer comes with its explanation
                    assert bool(explanation) == (here and (other_source, other_layer, other) == EXPLAINED)
                    if explanation:
                        assert explanation == [HOSTILE]
                    found[(unit["u"], kind, rank, other_source, other_layer, other)] = score
    return found


def test_every_shard_carries_its_units_neighbours(site: Path) -> None:
    store = site.parent / "store.duckdb"
    for source, layer in (("sae:a", 0), ("sae:b", 1), ("sae:m", 1), ("mlp", 1)):
        view = query(store, """SELECT unit, kind, rank, other_source, other_layer, other_unit, score FROM neighbours
                              WHERE source = ? AND layer = ? AND rank <= 10""", [source, layer])
        assert len(view) > 100
        shown = shard_neighbours(site, source, layer)
        assert shown.keys() == {row[:-1] for row in view}
        assert all(shown[row[:-1]] == pytest.approx(row[-1], rel=1e-4, abs=1e-9) for row in view)


def test_layers_with_a_map_link_to_it(site: Path) -> None:
    for source, layer in (("sae:a", 0), ("sae:b", 1), ("sae:m", 1)):
        folder = layer_folder(site, source, layer)
        assert (folder / "map.html").is_file()
        assert '<a href="map.html">Map of these units</a>' in (folder / "index.html").read_text()
        assert 'data-map="map.html"' in (folder / "unit.html").read_text()
        assert 'src="../../../static/similar.js"' in (folder / "unit.html").read_text()
    mlp = layer_folder(site, "mlp", 1)
    assert not (mlp / "map.html").exists() and "map.html" not in (mlp / "index.html").read_text() + (
        mlp / "unit.html").read_text()


# --- in a browser -------------------------------------------------------------------------------------------------

def first_listed(store: Path, source: str, unit: int, kind: str) -> tuple[str, int, int]:
    return query(store, """SELECT other_source, other_layer, other_unit FROM neighbours
                          WHERE source = ? AND unit = ? AND kind = ? AND rank = 1""", [source, unit, kind])[0]


@pytest.mark.browser
def test_the_panel_opens_the_right_units_and_the_map_rings_the_unit(page: object, site: Path) -> None:
    from playwright.sync_api import expect

    store = site.parent / "store.duckdb"
    source, layer, unit = EXPLAINED
    start = layer_folder(site, source, layer) / "unit.html"
    page.goto(f"{start.as_uri()}#{unit}")  # type: ignore[attr-defined]
    panel = page.locator("#similar")  # type: ignore[attr-defined]
    expect(panel).to_be_visible()
    assert page.locator(".toc a[data-target=similar]").inner_text() == "Similar units"  # type: ignore
    for kind in ("cooccurrence", "decoder", "encoder", "decoder_across"):
        expect(panel.locator(f"table[data-kind={kind}] tbody tr")).to_have_count(K)

    # a unit of the same layer: the fragment changes, the page draws it
    _, _, other = first_listed(store, source, unit, "cooccurrence")
    link = panel.locator("table[data-kind=cooccurrence] tbody tr").first.get_by_role("link")
    expect(link).to_have_text(f"Feature {other}")
    link.click()
    expect(page.locator("h1")).to_have_text(f"Feature {other}")  # type: ignore[attr-defined]
    assert page.url.endswith(f"/sae-a/0/unit.html#{other}")  # type: ignore[attr-defined]

    # one whose own list holds the explained unit shows its explanation, as text
    explained_by = query(store, """SELECT unit FROM neighbours WHERE source = ? AND kind = 'decoder'
                                  AND other_unit = ? ORDER BY unit LIMIT 1""", [source, unit])[0][0]
    page.goto(f"{start.as_uri()}#{explained_by}")  # type: ignore[attr-defined]
    expect(page.locator("h1")).to_have_text(f"Feature {explained_by}")  # type: ignore[attr-defined]
    expect(page.locator("#similar table[data-kind=decoder]")).to_contain_text(HOSTILE)  # type: ignore
    assert page.locator("#similar img").count() == 0  # type: ignore[attr-defined]

    # a unit of another dictionary: its layer's unit page
    page.goto(f"{start.as_uri()}#{unit}")  # type: ignore[attr-defined]
    expect(page.locator("h1")).to_have_text(f"Feature {unit}")  # type: ignore[attr-defined]
    other_source, other_layer, other = first_listed(store, source, unit, "decoder_across")
    assert (other_source, other_layer) == ("sae:b", 1)
    link = page.locator("#similar table[data-kind=decoder_across] tbody tr").first.get_by_role("link")  # type: ignore
    expect(link).to_have_text(f"Feature {other} \u00b7 sae:b layer 1")
    link.click()
    page.wait_for_url(f"**/sae-b/1/unit.html#{other}")  # type: ignore[attr-defined]
    expect(page.locator("h1")).to_have_text(f"Feature {other}")  # type: ignore[attr-defined]

    # the map, with this unit ringed
    page.locator("#map-link").click()  # type: ignore[attr-defined]
    page.wait_for_url(f"**/sae-b/1/map.html#unit={other}")  # type: ignore[attr-defined]
    expect(page.locator("#map")).to_have_attribute("data-selected", str(other))  # type: ignore[attr-defined]
    assert page.problems == [] and page.evaluate("window.__problems") == []  # type: ignore[attr-defined]


@pytest.mark.browser
def test_the_panel_is_accessible(page: object, site: Path) -> None:
    pytest.importorskip("axe_playwright_python")
    from axe_playwright_python.sync_playwright import Axe

    source, layer, unit = EXPLAINED
    page.goto(f"{(layer_folder(site, source, layer) / 'unit.html').as_uri()}#{unit}")  # type: ignore[attr-defined]
    page.locator("#similar table").first.wait_for()  # type: ignore[attr-defined]
    text = page.inner_text("#similar")  # type: ignore[attr-defined]
    assert "undefined" not in text and "NaN" not in text and "null" not in text
    assert page.problems == [] and page.evaluate("window.__problems") == []  # type: ignore[attr-defined]
    violations = [f"{v['id']} ({v['impact']}): {v['nodes'][0]['target']}" for v in Axe().run(page).response[
        "violations"] if v["impact"] in ("serious", "critical")]
    assert violations == []


@pytest.mark.browser
def test_a_layer_page_links_its_map(page: object, site: Path) -> None:
    from playwright.sync_api import expect

    page.goto((layer_folder(site, "sae:b", 1) / "index.html").as_uri())  # type: ignore[attr-defined]
    page.get_by_role("link", name="Map of these units").click()  # type: ignore[attr-defined]
    page.wait_for_url("**/sae-b/1/map.html")  # type: ignore[attr-defined]
    expect(page.locator("#map")).not_to_have_attribute("data-points", "0")  # type: ignore[attr-defined]
    assert page.problems == [] and page.evaluate("window.__problems") == []  # type: ignore[attr-defined]
