"""`featureatlas export`: the JSON files give back exactly what the store's views hold, the Neuronpedia layout has
the rows and fields Neuronpedia imports with the store's values in them, hostile text survives, and the output
folder appears whole or not at all."""

from __future__ import annotations

import gzip
import json
import shutil
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pytest

from featureatlas.cli import main
from featureatlas.errors import UsageError
from featureatlas.export import json_files as export_json
from featureatlas.export.common import MARKER, export_store, parse_layer_spec
from featureatlas.export.neuronpedia import neuronpedia_id
from featureatlas.slugs import unique_slugs
from featureatlas.store.schema import StoreError

from helpers.stores import query
from helpers.synthetic_store import (
    BOS,
    DEAD_FEATURE,
    DOC_NAMES,
    FEW_EXAMPLES,
    MISSING_TOKEN_ID,
    MODEL,
    NASTY_TOKENS,
    NEVER_SEEN,
    ONLY_NEGATIVE,
    RESID_OUTLIER,
    make_store,
)

HOSTILE_EXPLANATION = '<script>alert("x")</script>\u202e\n\t"quoted" \\ back\x00slash'
# (source, layer, unit, text, score, author): mlp layer 1 unit 0 has two, sae feature 2 one, the rest none
EXPLANATIONS = [("mlp", 1, 0, HOSTILE_EXPLANATION, 0.75, "<b>alice</b>"), ("mlp", 1, 0, "second thought", None, None),
                ("sae:res", 1, 2, "closing brackets", 0.5, "gpt-4o")]
KINDS = ("top", "bottom", "quantile", "random")
FEATURE_KEYS = {  # Neuronpedia's feature row, as SAEDashboard writes it
    "modelId", "layer", "index", "creatorId", "createdAt", "maxActApprox", "hasVector", "vector", "vectorLabel",
    "vectorDefaultSteerStrength", "hookName", "topkCosSimIndices", "topkCosSimValues", "neuron_alignment_indices",
    "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_pearson",
    "correlated_neurons_l1", "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
    "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "decoder_weights_dist", "sourceSetName"}
ACTIVATION_KEYS = {
    "id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue", "values", "creatorId",
    "dataSource", "dataIndex", "dfaValues", "dfaTargetIndex", "dfaMaxValue", "createdAt", "lossValues",
    "logitContributions", "binMin", "binMax", "binContains", "qualifyingTokenIndex", "zIndices", "zValues"}
EXPLANATION_KEYS = {"id", "modelId", "layer", "index", "description", "authorId", "embedding", "triggeredById",
                    "typeName", "explanationModelName", "notes", "createdAt"}


def add_explanations(path: Path, rows: list[tuple]) -> None:
    """Explanations as `featureatlas annotate` stores them; a store without the view gets the minimal one the
    export reads (model, source, layer, unit, text, score, author)."""
    con = duckdb.connect(str(path))
    try:
        if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'explanations'"
                           ).fetchone()[0]:
            con.execute("CREATE TABLE t_explanations (model VARCHAR, source VARCHAR, layer INTEGER, unit INTEGER, "
                        "text VARCHAR, score DOUBLE, author VARCHAR)")
            con.execute("CREATE VIEW explanations AS SELECT * FROM t_explanations")
        columns = [row[0] for row in con.execute("DESCRIBE t_explanations").fetchall()]
        defaults = {"score_kind": None, "file": "notes.csv", "added_at": datetime(2025, 1, 3)}
        for source, layer, unit, text, score, author in rows:
            values = {"model": MODEL, "source": source, "layer": layer, "unit": unit, "text": text, "score": score,
                      "author": author, **{k: v for k, v in defaults.items() if k in columns}}
            con.execute(f"INSERT INTO t_explanations ({', '.join(values)}) VALUES "
                        f"({', '.join('?' for _ in values)})", list(values.values()))
    finally:
        con.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_store(tmp_path_factory.mktemp("export-store") / "store.duckdb")
    add_explanations(path, EXPLANATIONS)
    return path


@pytest.fixture(scope="module")
def json_out(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # small chunks and two threads, so chunk boundaries and concurrency are exercised
    out = tmp_path_factory.mktemp("export-json") / "out"
    export_store(store, out, progress=False, chunk_units=7, workers=2)
    return out


@pytest.fixture(scope="module")
def np_out(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export-np") / "out"
    export_store(store, out, "neuronpedia", progress=False, chunk_units=40, workers=2, batch_size=16)
    return out


def unit_file(out: Path, source: str, layer: int, unit: int) -> dict:
    model_slug = unique_slugs([MODEL])[MODEL]
    return json.loads((out / model_slug / unique_slugs(["mlp", "resid", "sae:res"])[source] / str(layer)
                       / f"{unit}.json").read_text(encoding="utf-8"))


def same_f32(exported: float | None, stored: float | None) -> bool:
    """A FLOAT column's value came back exactly (the export writes the shortest text that reads back to it)."""
    if stored is None or not np.isfinite(stored):
        return exported is None
    return exported is not None and np.float32(exported) == np.float32(stored)


# --- json ------------------------------------------------------------------------------------------------------------


def test_json_layout_and_index(store: Path, json_out: Path) -> None:
    index = json.loads((json_out / "index.json").read_text(encoding="utf-8"))
    assert (index["format"], index["version"]) == ("featureatlas.index", 1)
    assert (index["unit_format"], index["unit_version"]) == ("featureatlas.unit", 1)
    counts = {(s, layer): n for s, layer, n in query(store, "SELECT source, layer, count(*) FROM units GROUP BY ALL")}
    assert index["n_units"] == sum(counts.values()) == 300
    [model] = index["models"]
    assert model["model"] == MODEL and model["slug"] == unique_slugs([MODEL])[MODEL]
    listed = {}
    for source in model["sources"]:
        for layer in source["layers"]:
            listed[source["source"], layer["layer"]] = layer["n_units"]
            folder = json_out / layer["path"]
            assert sorted(int(p.stem) for p in folder.glob("*.json")) == list(range(layer["n_units"]))
            assert layer["hook_name"] and layer["kind"] in ("mlp", "resid", "sae")
    assert listed == counts
    sae_layer = next(s for s in model["sources"] if s["source"] == "sae:res")["layers"][0]
    assert sae_layer["config"]["note"] == "</pre><script>alert(3)</script>"  # parsed JSON, not a string
    [run] = index["runs"]
    stored = query(store, "SELECT model, n_tokens, context_length, bos_token, corpus FROM runs")[0]
    assert (run["model"], run["n_tokens"], run["context_length"], run["bos_token"], run["corpus"]) == stored
    assert run["settings"] == {"seed": 0} and run["started_at"] == "2025-01-02T03:04:00"
    assert (json_out / MARKER).is_file()
    assert [p.name for p in json_out.parent.iterdir()] == ["out"]  # no temporary folder left beside it


@pytest.mark.parametrize("source, layer, unit", [
    ("mlp", 1, 0), ("mlp", 0, 1), ("mlp", 1, NEVER_SEEN), ("mlp", 1, ONLY_NEGATIVE), ("resid", 0, FEW_EXAMPLES),
    ("resid", 1, RESID_OUTLIER), ("sae:res", 1, 1), ("sae:res", 1, DEAD_FEATURE), ("sae:res", 1, 2)])
def test_json_unit_round_trips_the_store(store: Path, json_out: Path, source: str, layer: int, unit: int) -> None:
    doc = unit_file(json_out, source, layer, unit)
    key = [MODEL, source, layer, unit]
    assert (doc["format"], doc["version"], doc["model"], doc["source"], doc["layer"], doc["unit"]) == (
        "featureatlas.unit", 1, MODEL, source, layer, unit)

    names = ["n_tokens", "n_firing", "frequency", "mean", "std", "min_activation", "max_activation"]
    row = query(store, f"SELECT {', '.join(names)} FROM statistics WHERE model = ? AND source = ? AND layer = ? "
                     "AND unit = ?", key)[0]
    stats = doc["statistics"]
    for name, value in zip(names, row, strict=True):
        if name in ("min_activation", "max_activation"):
            assert same_f32(stats[name], value), name
        elif isinstance(value, float) and not np.isfinite(value) or value is None:
            assert stats[name] is None, name
        else:
            assert stats[name] == value, name  # DOUBLEs and integers: exactly
    assert stats["n_examples"] == query(store, "SELECT n_examples FROM units WHERE model = ? AND source = ? AND "
                                             "layer = ? AND unit = ?", key)[0][0]

    bins = query(store, "SELECT bin, lo, hi, count FROM histograms WHERE model = ? AND source = ? AND layer = ? AND "
                      "unit = ? ORDER BY bin", key)
    assert [(b["bin"], b["lo"], b["hi"], b["count"]) for b in doc["histogram"]] == [
        (b, lo, hi if np.isfinite(hi) else None, n) for b, lo, hi, n in bins]

    for polarity in ("top", "bottom"):
        stored = query(store, "SELECT token_id, token, effect FROM logit_effects WHERE model = ? AND source = ? AND "
                            "layer = ? AND unit = ? AND polarity = ? ORDER BY rank", [*key, polarity])
        exported = doc["logits"][polarity]
        assert [(e["token_id"], e["token"]) for e in exported] == [(i, t) for i, t, _ in stored]
        assert all(same_f32(e["effect"], s[2]) for e, s in zip(exported, stored, strict=True))

    stored = query(store, """
        SELECT e.example_kind, e.rank, e.interval_lo, e.interval_hi, e.max_activation, e.max_position, e.context_id,
               d.name, c.start_token, c.tokens, e.activations
        FROM examples e JOIN contexts c USING (context_id) JOIN documents d USING (document_id)
        WHERE e.model = ? AND e.source = ? AND e.layer = ? AND e.unit = ?""", key)
    order = {kind: i for i, kind in enumerate(KINDS)}
    stored.sort(key=lambda r: (order[r[0]], -(r[3] if r[3] is not None else np.inf), r[1]))  # page order
    examples = doc["examples"]
    assert [(e["kind"], e["rank"]) for e in examples] == [(r[0], r[1]) for r in stored]
    for e, (kind, _, lo, hi, value, position, context, name, start, tokens, acts) in zip(examples, stored,
                                                                                           strict=True):
        assert (e["max_position"], e["context_id"], e["document"], e["start_token"]) == (position, context, name,
                                                                                          start)
        assert e["tokens"] == tokens and e["tokens"][0] == BOS
        assert same_f32(e["max_activation"], value)
        assert np.array_equal(np.array(e["activations"], np.float32), np.array(acts, np.float32))
        if kind == "quantile":
            assert same_f32(e["interval"][0], lo) and same_f32(e["interval"][1], hi)
        else:
            assert e["interval"] is None

    expected = [(text, score, author) for s, la, u, text, score, author in EXPLANATIONS if (s, la, u) == (
        source, layer, unit)]
    assert [(x["text"], x["score"], x["author"]) for x in doc["explanations"]] == expected
    assert all("score_kind" in x for x in doc["explanations"])


def test_json_special_units(json_out: Path) -> None:
    never = unit_file(json_out, "mlp", 1, NEVER_SEEN)
    assert never["statistics"]["max_activation"] is None and never["statistics"]["frequency"] is None
    assert never["examples"] == [] and never["histogram"] == []
    assert unit_file(json_out, "mlp", 0, 0)["logits"] == {"top": [], "bottom": []}  # MLP layer 0 has none
    bottom = unit_file(json_out, "sae:res", 1, 1)["logits"]["bottom"]
    assert bottom[-1] == {"token_id": MISSING_TOKEN_ID, "token": None, "effect": bottom[-1]["effect"]}
    dead = unit_file(json_out, "sae:res", 1, DEAD_FEATURE)
    assert dead["examples"] == [] and dead["statistics"]["n_firing"] == 0
    outlier = unit_file(json_out, "resid", 1, RESID_OUTLIER)
    assert {e["kind"] for e in outlier["examples"]} == {"top", "bottom", "quantile", "random"}


def test_hostile_text_survives_exactly(store: Path, json_out: Path) -> None:
    doc = unit_file(json_out, "resid", 1, 0)
    assert [e["token"] for e in doc["logits"]["top"]] == NASTY_TOKENS[:10]  # unit 0 promotes the hostile tokens
    assert {e["document"] for e in doc["examples"]} <= set(DOC_NAMES)
    assert unit_file(json_out, "mlp", 1, 0)["explanations"][0]["text"] == HOSTILE_EXPLANATION
    raw = next((json_out / unique_slugs([MODEL])[MODEL] / "resid" / "1").glob("0.json")).read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" in raw and "&lt;" not in raw and "\\u003c" not in raw  # no HTML escaping
    assert '"a\\u0000b"' in raw  # a NUL is escaped as JSON requires, and comes back as the same string


def test_missing_explanations_view_means_none(store: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.duckdb"
    shutil.copy(store, copy)
    con = duckdb.connect(str(copy))
    con.execute("DROP VIEW explanations")
    con.close()
    export_store(copy, tmp_path / "out", progress=False, sources=["mlp"], layers="1")
    assert unit_file(tmp_path / "out", "mlp", 1, 0)["explanations"] == []


def test_filters(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = export_store(store, out, progress=False, sources=["resid", "sae:res"], layers="1")
    assert summary.units == 150 and summary.files == 151
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert [(s["source"], [la["layer"] for la in s["layers"]]) for s in index["models"][0]["sources"]] == [
        ("resid", [1]), ("sae:res", [1])]
    model_dir = out / unique_slugs([MODEL])[MODEL]
    assert sorted(p.name for p in model_dir.iterdir()) == ["resid", "sae-res"]
    assert [p.name for p in (model_dir / "resid").iterdir()] == ["1"]
    assert parse_layer_spec("0,3-5, 7") == {0, 3, 4, 5, 7}


# The library names each setting as export_store's argument; the command line names its flag (test_command_line).
@pytest.mark.parametrize("kwargs, message", [
    ({"sources": ["nope"]}, "sources 'nope': the store has no such source; it has: mlp, resid, sae:res"),
    ({"layers": "1-x"}, "'1-x' is not a layer number or a range like 3-5"),
    ({"layers": "3-1"}, "is not a range of layers"),
    ({"layers": "0,7"}, "layer(s) 7 not in the store; it has layers 0-1"),
    ({"sources": ["sae:res"], "layers": "0"}, "layer(s) 0 not in the store for these sources; it has layers 1"),
    ({"set_name": "x"}, "set_name applies to fmt neuronpedia only"),
    ({"fmt": "neuronpedia", "set_name": "x"}, "set_name names one source set, but 3 sources"),
    ({"fmt": "neuronpedia", "model_id": "a/b"}, "model_id 'a/b': use letters, digits"),
    ({"fmt": "neuronpedia", "batch_size": 0}, "batch_size 0"),
    ({"fmt": "yaml"}, "fmt 'yaml'"),
])
def test_bad_options_are_refused_before_writing(store: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError) as err:
        export_store(store, tmp_path / "out", progress=False, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_not_a_store(tmp_path: Path) -> None:
    fake = tmp_path / "fake.duckdb"
    fake.write_text("not a database")
    with pytest.raises(StoreError, match="not a featureatlas store"):
        export_store(fake, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_out_is_refused_then_replaced_with_overwrite(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export_store(store, out, progress=False, sources=["sae:res"])
    (out / "stale.txt").write_text("from before")
    with pytest.raises(UsageError, match="already exists; pass overwrite"):
        export_store(store, out, progress=False, sources=["mlp"])
    assert (out / "stale.txt").is_file()  # untouched
    export_store(store, out, progress=False, sources=["mlp"], layers="1", overwrite=True)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in (out / unique_slugs([MODEL])[MODEL]).iterdir()) == ["mlp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "cat.jpg").write_text("meow")
    with pytest.raises(UsageError, match="is not a featureatlas export"):
        export_store(store, stranger, progress=False, overwrite=True)
    assert (stranger / "cat.jpg").read_text() == "meow"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        export_store(store, tmp_path / "file", progress=False, overwrite=True)


def test_a_failed_export_leaves_nothing(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    export_store(store, out, progress=False, sources=["sae:res"])
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    monkeypatch.setattr(export_json, "unit_sql", lambda explanations: "SELECT no_such_column FROM units")
    with pytest.raises(duckdb.Error):
        export_store(store, out, progress=False, overwrite=True, chunk_units=5)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the earlier export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and no temporary folder is left


# --- neuronpedia -----------------------------------------------------------------------------------------------------


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def source_folder(np_out: Path, source: str, layer: int) -> Path:
    return np_out / neuronpedia_id(MODEL) / f"{layer}-{neuronpedia_id(source)}"


def batches(folder: Path, kind: str) -> list[dict]:
    files = sorted(folder.joinpath(kind).glob("batch-*.jsonl.gz"), key=lambda p: int(p.name.split("-")[1][:-9]))
    return [row for path in files for row in read_jsonl_gz(path)]


def test_neuronpedia_layout(store: Path, np_out: Path) -> None:
    model_id = neuronpedia_id(MODEL)
    assert model_id == "tiny-lm-b-v1-b-x"
    folders = sorted(p.name for p in (np_out / model_id).iterdir())
    assert folders == ["0-mlp", "0-resid", "1-mlp", "1-resid", "1-sae-res"]
    for name in folders:
        folder = np_out / model_id / name
        rows = {f: [json.loads(line) for line in (folder / f"{f}.jsonl").read_text(encoding="utf-8").splitlines()]
                for f in ("release", "model", "sourceset", "source")}
        assert all(len(r) == 1 for r in rows.values())
        [release], [model], [sourceset], [source] = rows.values()
        assert model["id"] == model_id and model["displayName"] == MODEL and model["layers"] == 2
        assert source["id"] == name and source["modelId"] == model_id and source["setName"] == sourceset["name"]
        assert sourceset["releaseName"] == release["name"] and source["num_tokens_in_prompt"] == 15  # BOS dropped
        n_units = 100 if name == "1-sae-res" else 50
        files = sorted(p.name for p in (folder / "features").iterdir())
        assert files == sorted(f"batch-{i}.jsonl.gz" for i in range(-(-n_units // 16)))
        assert sorted(p.name for p in (folder / "activations").iterdir()) == files
        features = batches(folder, "features")
        assert [f["index"] for f in features] == [str(u) for u in range(n_units)]  # every unit once, in order
        assert all(set(f) == FEATURE_KEYS and f["layer"] == name and f["modelId"] == model_id for f in features)
        activations = batches(folder, "activations")
        assert all(set(a) == ACTIVATION_KEYS for a in activations)
        assert len({a["id"] for a in activations}) == len(activations)
        assert all(len(a["id"]) == 25 and a["id"].startswith("c") for a in activations)
    assert {p.name for p in source_folder(np_out, "mlp", 1).iterdir()} >= {"explanations"}
    assert not (source_folder(np_out, "mlp", 0) / "explanations").exists()


@pytest.mark.parametrize("source, layer", [("mlp", 1), ("resid", 0), ("sae:res", 1)])
def test_neuronpedia_values_match_the_store(store: Path, np_out: Path, source: str, layer: int) -> None:
    folder = source_folder(np_out, source, layer)
    features = {int(f["index"]): f for f in batches(folder, "features")}
    activations: dict[int, list[dict]] = {}
    for a in batches(folder, "activations"):
        activations.setdefault(int(a["index"]), []).append(a)
    for unit in (0, 1, NEVER_SEEN, ONLY_NEGATIVE, FEW_EXAMPLES):
        key = [MODEL, source, layer, unit]
        feature = features[unit]
        frequency, max_activation = query(store, "SELECT frequency, max_activation FROM statistics WHERE model = ? "
                                               "AND source = ? AND layer = ? AND unit = ?", key)[0]
        assert same_f32(feature["maxActApprox"], max_activation)
        assert feature["frac_nonzero"] == (frequency if frequency is not None else 0)
        for polarity, names in (("top", ("pos_str", "pos_values")), ("bottom", ("neg_str", "neg_values"))):
            stored = query(store, "SELECT token, effect FROM logit_effects WHERE model = ? AND source = ? AND "
                                "layer = ? AND unit = ? AND polarity = ? AND token IS NOT NULL ORDER BY rank",
                         [*key, polarity])
            assert feature[names[0]] == [t for t, _ in stored]
            assert all(same_f32(v, e) for v, (_, e) in zip(feature[names[1]], stored, strict=True))
        bins = query(store, "SELECT lo, hi, count FROM histograms WHERE model = ? AND source = ? AND layer = ? AND "
                          "unit = ? AND bin > 0 AND count > 0 ORDER BY bin", key)
        assert feature["freq_hist_data_bar_heights"] == [n for _, _, n in bins]
        assert feature["freq_hist_data_bar_values"] == [(lo + hi) / 2 if np.isfinite(hi) else lo for lo, hi, _ in bins]
        assert feature["logits_hist_data_bar_heights"] == feature["logits_hist_data_bar_values"] == []

        stored = query(store, """
            SELECT e.example_kind, e.interval_lo, e.interval_hi, e.max_activation, e.max_position, c.tokens,
                   e.activations
            FROM examples e JOIN contexts c USING (context_id)
            WHERE e.model = ? AND e.source = ? AND e.layer = ? AND e.unit = ? AND e.example_kind IN ('top', 'quantile')
            ORDER BY e.example_kind = 'quantile', e.interval_hi DESC, e.rank""", key)
        rows = activations.get(unit, [])
        assert len(rows) == len(stored)
        for row, (kind, lo, hi, value, position, tokens, acts) in zip(rows, stored, strict=True):
            assert tokens[0] == BOS and row["tokens"] == tokens[1:]  # the BOS position never counts: dropped
            assert np.array_equal(np.array(row["values"], np.float32), np.array(acts[1:], np.float32))
            assert same_f32(row["maxValue"], value) and row["maxValueTokenIndex"] == position - 1
            assert row["qualifyingTokenIndex"] == position - 1
            assert np.float32(row["maxValue"]) == max(np.float32(v) for v in row["values"])
            assert same_f32(row["minValue"], min(acts[1:]))
            if kind == "top":
                assert (row["binMin"], row["binContains"]) == (-1, -1) and same_f32(row["binMax"], max_activation)
            else:
                assert same_f32(row["binMin"], lo) and same_f32(row["binMax"], hi) and row["binContains"] is None


def test_neuronpedia_explanations(np_out: Path) -> None:
    rows = batches(source_folder(np_out, "mlp", 1), "explanations")
    assert all(set(r) == EXPLANATION_KEYS for r in rows)
    assert [(r["index"], r["description"], r["notes"]) for r in rows] == [
        ("0", HOSTILE_EXPLANATION, "author: <b>alice</b>; score: 0.75"), ("0", "second thought", None)]
    [sae] = batches(source_folder(np_out, "sae:res", 1), "explanations")
    assert (sae["index"], sae["description"], sae["layer"]) == ("2", "closing brackets", "1-sae-res")


def test_neuronpedia_hostile_text(np_out: Path) -> None:
    [feature] = [f for f in batches(source_folder(np_out, "resid", 1), "features") if f["index"] == "0"]
    assert feature["pos_str"] == NASTY_TOKENS[:10]
    [model] = [json.loads(line) for line in (source_folder(np_out, "mlp", 1) / "model.jsonl").read_text(
        encoding="utf-8").splitlines()]
    assert model["displayName"] == MODEL


def test_two_models(tmp_path: Path) -> None:
    models = (MODEL, "tiny/LM")
    store = make_store(tmp_path / "two.duckdb", n_layers=1, n_units=8, models=models, sources=("mlp",))
    export_store(store, tmp_path / "json", progress=False)
    index = json.loads((tmp_path / "json" / "index.json").read_text(encoding="utf-8"))
    assert [(m["model"], m["slug"]) for m in index["models"]] == sorted(unique_slugs(models).items())
    assert len(index["runs"]) == 2 and index["n_units"] == 16
    with pytest.raises(UsageError, match="model_id names one model, but the store has 2"):
        export_store(store, tmp_path / "np", "neuronpedia", progress=False, model_id="tiny")
    export_store(store, tmp_path / "np", "neuronpedia", progress=False)
    assert sorted(p.name for p in (tmp_path / "np").iterdir() if not p.name.startswith(".")) == [
        "tiny-lm", "tiny-lm-b-v1-b-x"]


# --- the command line ------------------------------------------------------------------------------------------------


def test_cli(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "json"
    assert main(["export", str(store), "--out", str(out), "--source", "sae:res", "--workers", "1"]) == 0
    assert "exported 100 units in 101 files" in capsys.readouterr().out
    assert unit_file(out, "sae:res", 1, 2)["explanations"][0]["text"] == "closing brackets"

    assert main(["export", str(store), "--out", str(out), "--source", "mlp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"featureatlas export: error: {out}: already exists; pass --overwrite to replace it, or choose "
                   "another --out"]
    assert main(["export", str(store), "--out", str(out), "--layers", "9"]) == 2
    assert "layer(s) 9 not in the store" in capsys.readouterr().err
    assert main(["export", str(store), "--out", str(tmp_path / "other"), "--neuronpedia-set", "x"]) == 2
    assert "error: --neuronpedia-set applies to --format neuronpedia only" in capsys.readouterr().err

    np_dir = tmp_path / "np"
    assert main(["export", str(store), "--format", "neuronpedia", "--out", str(np_dir), "--source", "sae:res",
                 "--neuronpedia-model-id", "tiny-lm", "--neuronpedia-set", "res-jb", "--neuronpedia-creator-id",
                 "someone", "--batch-size", "64"]) == 0
    folder = np_dir / "tiny-lm" / "1-res-jb"
    assert sorted(p.name for p in (folder / "features").iterdir()) == ["batch-0.jsonl.gz", "batch-1.jsonl.gz"]
    first = read_jsonl_gz(folder / "features" / "batch-0.jsonl.gz")
    assert len(first) == 64 and first[0]["creatorId"] == "someone" and first[0]["sourceSetName"] == "res-jb"
    assert json.loads((folder / "source.jsonl").read_text())["setName"] == "res-jb"


def test_help_names_the_formats(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert "--format {json,neuronpedia}" in text and "--neuronpedia-model-id" in text and "--overwrite" in text
