"""`featureatlas annotate` and unit addresses: every input format, every address form, bad input refused with one
line naming the file and line, all or nothing, idempotent, --replace, old stores, hostile text kept verbatim."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import duckdb
import pytest

import featureatlas.annotate.explanations as annotate_module
from featureatlas.annotate.explanations import AnnotationError, annotate
from featureatlas.cli import main
from featureatlas.store.addresses import AddressError, UnknownUnitError, parse_address, store_sources
from featureatlas.store.schema import SCHEMA_VERSION, StoreError, ensure_explanations, open_store

from helpers.synthetic_store import make_store

M = "m"  # make_store's stores here: mlp and resid on layers 0-1 (50 units each), sae:res on layer 1 (100 units)
HOSTILE = ["<script>alert(1)</script>", "a\x00b", "\u202eevil", "\u2066x\u2069 and \u200b", "two\nlines\r\n",
           "'; DROP TABLE t_explanations; --", "{{ 7*7 }}", "</textarea>&amp;"]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return empty_of_explanations(make_store(tmp_path_factory.mktemp("annotate") / "store.duckdb", models=(M,),
                                            n_units=50))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return empty_of_explanations(make_store(tmp_path_factory.mktemp("annotate2") / "store.duckdb",
                                            models=("a", "b/c"), n_units=50))


def empty_of_explanations(store: Path) -> Path:
    """The tests count every explanation: start from none, whatever the synthetic store comes with."""
    sql(store, "DELETE FROM t_explanations")
    return store


@pytest.fixture
def store(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(template, tmp_path / "store.duckdb"))


def rows(store: Path, columns: str = "source, layer, unit, text, score, score_kind, author",
         where: str = "TRUE") -> list[tuple]:
    """The store's explanations, sorted."""
    con = duckdb.connect(str(store), read_only=True)
    try:
        return con.execute(f"SELECT {columns} FROM explanations WHERE {where} ORDER BY ALL").fetchall()
    finally:
        con.close()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


def jsonl(path: Path, items: list[dict]) -> Path:
    return write(path, "".join(json.dumps(i) + "\n" for i in items))


def sql(store: Path, statement: str, params: list | None = None) -> None:
    con = duckdb.connect(str(store))
    con.execute(statement, params or [])
    con.close()


# ---- addresses -----------------------------------------------------------------------------------------------

SOURCES = [(M, "mlp", 0, 50), (M, "mlp", 12, 1536), (M, "resid", 3, 576), (M, "resid", 12, 576),
           (M, "sae:res14", 14, 4096), (M, "transcoder:tc", 5, 100), (M, "sae:wide", 2, 10), (M, "sae:wide", 4, 10)]


@pytest.mark.parametrize("text, expected", [
    ("mlp/12/345", ("mlp", 12, 345)), ("L12 N345", ("mlp", 12, 345)), ("L12N345", ("mlp", 12, 345)),
    ("l12/n345", ("mlp", 12, 345)), ("12/345", ("mlp", 12, 345)), ("12 345", ("mlp", 12, 345)),
    ("3/507", ("resid", 3, 507)), ("resid/3/507", ("resid", 3, 507)), ("resid L3 N507", ("resid", 3, 507)),
    ("sae:res14/123", ("sae:res14", 14, 123)), ("sae:res14 123", ("sae:res14", 14, 123)),
    ("sae:res14/14/123", ("sae:res14", 14, 123)), ("  sae:res14 / 14 / 123 ", ("sae:res14", 14, 123)),
    ("transcoder:tc 9", ("transcoder:tc", 5, 9)), ("transcoder:tc/5/9", ("transcoder:tc", 5, 9)),
    ("sae:wide/4/4", ("sae:wide", 4, 4)), ("m::mlp/0/1", ("mlp", 0, 1)),
    ("14/2", ("sae:res14", 14, 2)), ("2/1", ("sae:wide", 2, 1)),  # the one source on that layer
])
def test_address_forms(text: str, expected: tuple) -> None:
    assert parse_address(text, SOURCES) == (M, *expected)


@pytest.mark.parametrize("text, error, message", [
    ("mlp/12/1536", UnknownUnitError, "no unit 1536 in mlp layer 12, which has units 0-1535"),
    ("mlp/7/1", UnknownUnitError, "no layer 7 in 'mlp'; it has mlp (layers 0, 12)"),
    ("sae:nope/1", UnknownUnitError, "no source 'sae:nope' in the store; it has mlp (layers 0, 12), resid"),
    ("other::mlp/0/1", UnknownUnitError, "no model 'other' in the store; it holds 'm'"),
    ("L3N5", UnknownUnitError, "no layer 3 in 'mlp'"),
    ("7/1", UnknownUnitError, "unit address '7/1': no layer 7 in the store; it has mlp (layers 0, 12), resid"),
    ("sae:wide/4", AddressError, "names no layer, and sae:wide has layers 2, 4; write sae:wide/LAYER/4"),
    ("345", AddressError, "names no source"),
    ("mlp", AddressError, "cannot be read"),
    ("mlp/12/-1", AddressError, "cannot be read"),
    ("neuron 5 of layer 2", AddressError, "cannot be read; write SOURCE/LAYER/UNIT"),
    ("", AddressError, "empty unit address"),
])
def test_bad_addresses_say_what_exists(text: str, error: type, message: str) -> None:
    with pytest.raises(error) as caught:
        parse_address(text, SOURCES)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_ambiguous_layer_and_models() -> None:
    sources = [(M, "resid", 3, 10), (M, "sae:x", 3, 10)]
    with pytest.raises(AddressError, match=r"ambiguous: layer 3 is in 'resid', 'sae:x'; write SOURCE/3/1"):
        parse_address("3/1", sources)
    assert parse_address("3/1", sources, default_source="sae:x") == (M, "sae:x", 3, 1)
    two = [("a", "mlp", 1, 10), ("b::x", "mlp", 1, 10)]
    with pytest.raises(AddressError, match=r"models 'a', 'b::x'; name one \(MODEL::mlp/1/2, or --model\)"):
        parse_address("mlp/1/2", two)
    assert parse_address("b::x::mlp/1/2", two) == ("b::x", "mlp", 1, 2)  # the longest model name that fits
    assert parse_address("a::L1N2", two) == ("a", "mlp", 1, 2)


def test_store_sources_reads_a_store(template: Path) -> None:
    con = open_store(template)
    sources = store_sources(con)
    con.close()
    assert parse_address("sae:res 99", sources) == (M, "sae:res", 1, 99)
    with pytest.raises(UnknownUnitError, match="no unit 100 in sae:res layer 1, which has units 0-99"):
        parse_address("sae:res 100", sources)


# ---- the formats ---------------------------------------------------------------------------------------------

def test_csv_with_every_address_form(store: Path, tmp_path: Path) -> None:
    notes = write(tmp_path / "notes.csv", "Unit,Text,score,author\n"
                  "mlp/1/3,closing brackets,0.5,alice\n"
                  "L1 N4,\"commas, and \"\"quotes\"\"\",,\n"
                  "L0N5,\"multi\nline\",,\n"
                  "\n"
                  "1/7,the word 'the',-1e-3,bob\n"
                  "resid/0/9,massive activation,,\n"
                  "sae:res/99,dead feature,,\n"
                  "sae:res 12,spaces,,\n"
                  "sae:res/1/13,full form,,\n")
    summary = annotate(store, notes)
    assert rows(store) == [
        ("mlp", 0, 5, "multi\nline", None, None, None),
        ("mlp", 1, 3, "closing brackets", 0.5, None, "alice"),
        ("mlp", 1, 4, 'commas, and "quotes"', None, None, None),
        ("mlp", 1, 7, "the word 'the'", -0.001, None, "bob"),
        ("resid", 0, 9, "massive activation", None, None, None),
        ("sae:res", 1, 12, "spaces", None, None, None),
        ("sae:res", 1, 13, "full form", None, None, None),
        ("sae:res", 1, 99, "dead feature", None, None, None)]
    assert summary.line().startswith(f"added 8 explanations of 8 units from notes.csv to {store}")
    assert {r[0] for r in rows(store, "file")} == {"notes.csv"}
    assert rows(store, "DISTINCT model") == [(M,)]


def test_csv_and_tsv_columns(store: Path, tmp_path: Path) -> None:
    annotate(store, write(tmp_path / "cols.csv", "model,source,layer,index,explanation,score_kind,score\n"
                                                 f"{M},resid,1,2,resid two,detection,0.9\n"
                                                 ",,0,3,no source: mlp,,\n"
                                                 ",sae:res,,4,one-layer source,,\n"))
    annotate(store, write(tmp_path / "cols.tsv", "layer\tunit\tdescription\n1\t8\ttab, separated\n"))
    assert rows(store) == [("mlp", 0, 3, "no source: mlp", None, None, None),
                           ("mlp", 1, 8, "tab, separated", None, None, None),
                           ("resid", 1, 2, "resid two", 0.9, "detection", None),
                           ("sae:res", 1, 4, "one-layer source", None, None, None)]


def test_jsonl_and_json(store: Path, tmp_path: Path) -> None:
    jsonl(tmp_path / "a.jsonl", [{"address": "mlp/0/1", "explanation": "first", "score": 0.25, "author": "me",
                                  "method": "simulation"},
                                 {"unit": "sae:res 5", "text": "second"},
                                 {"source": "resid", "layer": 1, "unit": 6, "description": "third"}])
    annotate(store, tmp_path / "a.jsonl")
    write(tmp_path / "b.json", json.dumps([{"unit": "L1N9", "text": "array row"}]))
    annotate(store, tmp_path / "b.json")
    write(tmp_path / "c.json", json.dumps({"explanations": [{"unit": "L1N10", "text": "wrapped"}]}, indent=2))
    annotate(store, tmp_path / "c.json")
    write(tmp_path / "d.json", '{"unit": "L1N11", "text": "lines in a .json"}\n{"unit": "L1N12", "text": "2"}\n')
    annotate(store, tmp_path / "d.json")
    assert rows(store) == [("mlp", 0, 1, "first", 0.25, "simulation", "me"),
                           ("mlp", 1, 9, "array row", None, None, None),
                           ("mlp", 1, 10, "wrapped", None, None, None),
                           ("mlp", 1, 11, "lines in a .json", None, None, None),
                           ("mlp", 1, 12, "2", None, None, None),
                           ("resid", 1, 6, "third", None, None, None),
                           ("sae:res", 1, 5, "second", None, None, None)]


def delphi_run(root: Path) -> Path:
    """delphi's layout: results/RUN/{run_config.json, explanations/, scores/SCORER/}, one file per latent."""
    run = root / "results" / "run1"
    write(run / "run_config.json", json.dumps({"model": M, "explainer_model": "Qwen/Qwen2.5-7B",
                                               "hookpoints": ["layers.1"]}))
    write(run / "explanations" / "layers.1_latent3.txt", json.dumps("Capitalised names of <b>cities</b>"))
    write(run / "explanations" / "layers.1_latent10.txt", json.dumps("the token ' and'"))
    write(run / "explanations" / "layers.1_latent11.txt", json.dumps("Explanation could not be parsed."))
    write(run / "explanations" / "notes.txt", "not a latent file: ignored")
    predictions = [{"str_tokens": ["a"], "activating": True, "prediction": True, "correct": c} for c in
                   (True, True, False, None)]
    write(run / "scores" / "fuzz" / "layers.1_latent3.txt", json.dumps(predictions[:1]))
    write(run / "scores" / "detection" / "layers.1_latent3.txt", json.dumps(predictions))
    write(run / "scores" / "fuzz" / "layers.1_latent10.txt", json.dumps(predictions[2:]))
    return run


def test_delphi_folder(store: Path, tmp_path: Path) -> None:
    run = delphi_run(tmp_path)
    with pytest.raises(AnnotationError) as caught:  # make_store's SAE reads blocks.1.hook_resid_post, not layers.1
        annotate(store, run / "explanations")
    assert str(caught.value).startswith(f"{run / 'explanations' / 'layers.1_latent3.txt'}: delphi module "
                                        "'layers.1' matches no source of the store")
    assert "--source layers.1=SOURCE" in str(caught.value)
    summary = annotate(store, run / "explanations", sources=["layers.1=sae:res"])
    expected = [("sae:res", 1, 3, "Capitalised names of <b>cities</b>", 2 / 3, "delphi detection accuracy",
                 "Qwen/Qwen2.5-7B"),
                ("sae:res", 1, 10, "the token ' and'", 0.0, "delphi fuzz accuracy", "Qwen/Qwen2.5-7B")]
    assert rows(store) == expected
    assert rows(store, "DISTINCT file") == [("run1/explanations",)]
    assert summary.line() == (f"added 2 explanations of 2 units from run1/explanations to {store}; skipped 1 "
                              "delphi files saying 'Explanation could not be parsed.'")
    # the run folder is the same input; a dictionary harvested from sparsify's folder (hook `layers.1`) matches
    sql(store, "UPDATE t_sources SET hook_name = 'layers.1' WHERE source = 'sae:res'")
    assert annotate(store, run, author="carol").added == 2
    assert annotate(store, run / "explanations" / "layers.1_latent3.txt", sources=["sae:res"]).added == 0
    assert len(rows(store)) == 4 and {r[6] for r in rows(store)} == {"Qwen/Qwen2.5-7B", "carol"}


def neuronpedia_rows() -> list[dict]:
    """Rows as Neuronpedia exports explanations (batch-N.jsonl.gz of its datasets; the API's JSON array)."""
    return [{"id": "clx1", "modelId": "gpt2-small", "layer": "1-res-jb", "index": "4", "authorId": "x",
             "description": "references to <i>Paris</i>", "embedding": None, "typeName": "oai_token-act-pair",
             "explanationModelName": "gpt-4o-mini", "umap_x": 0.1, "umap_y": None,
             "scores": [{"value": 0.42, "explanationScoreTypeName": "recall_alt", "explanationScoreModelName": "x"}]},
            {"id": "clx2", "modelId": "gpt2-small", "layer": "1-res-jb", "index": 7, "description": "years",
             "explanationModelName": None, "typeName": None}]


def test_neuronpedia_exports(store: Path, tmp_path: Path) -> None:
    batch = tmp_path / "1-res-jb" / "explanations" / "batch-0.jsonl.gz"
    batch.parent.mkdir(parents=True)
    batch.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in neuronpedia_rows()).encode()))
    with pytest.raises(AnnotationError, match=r"batch-0\.jsonl\.gz:1: Neuronpedia source '1-res-jb' matches no "
                                              r"source of the store .* --source 1-res-jb=SOURCE"):
        annotate(store, batch)
    summary = annotate(store, batch, sources=["1-res-jb=sae:res"])
    assert rows(store) == [("sae:res", 1, 4, "references to <i>Paris</i>", 0.42, "recall_alt", "gpt-4o-mini"),
                           ("sae:res", 1, 7, "years", None, None, None)]
    assert summary.file == "batch-0.jsonl.gz"
    # the folder of batches, mapped by the set's name; nothing new
    assert annotate(store, batch.parent, sources=["res-jb=sae:res"]).duplicates == 2
    # the old API's JSON array, and a feature with its explanations; mapped by the SAELens neuronpedia_id
    sql(store, "UPDATE t_sources SET config = ? WHERE source = 'sae:res'",
        [json.dumps({"metadata": {"neuronpedia_id": "gpt2-small/1-res-jb"}})])
    write(tmp_path / "export.json", json.dumps([dict(r, index=str(int(r["index"]) + 10)) for r in neuronpedia_rows()]))
    write(tmp_path / "feature.json", json.dumps({"modelId": "gpt2-small", "layer": "1-res-jb", "index": "30",
                                                 "explanations": [{"description": "one", "scores": []},
                                                                  {"description": "two", "author": "np user"}]}))
    assert annotate(store, tmp_path / "export.json").added == 2
    assert annotate(store, tmp_path / "feature.json").added == 2
    assert rows(store, "unit, text, author")[-4:] == [(14, "references to <i>Paris</i>", "gpt-4o-mini"),
                                                      (17, "years", None), (30, "one", None), (30, "two", "np user")]


def test_neuronpedia_plain_source_and_layer_mismatch(store: Path, tmp_path: Path) -> None:
    jsonl(tmp_path / "np.jsonl", [{"modelId": "x", "layer": "0-mlp", "index": "1", "description": "neuron"}])
    annotate(store, tmp_path / "np.jsonl", sources=["mlp"])
    assert rows(store) == [("mlp", 0, 1, "neuron", None, None, None)]
    jsonl(tmp_path / "np2.jsonl", [{"modelId": "x", "layer": "5-res-jb", "index": "1", "description": "d"}])
    with pytest.raises(AnnotationError, match=r"np2\.jsonl:1: .*no layer 5 in 'sae:res'; it has sae:res \(layer 1\)"):
        annotate(store, tmp_path / "np2.jsonl", sources=["sae:res"])


# ---- unknown units, bad rows, all or nothing -----------------------------------------------------------------

def test_unknown_unit_is_an_error_unless_skipped(store: Path, tmp_path: Path) -> None:
    notes = write(tmp_path / "notes.csv", "unit,text\nmlp/1/3,fine\nmlp/1/50,too far\nsae:other/1,no such\n")
    with pytest.raises(AnnotationError) as caught:
        annotate(store, notes)
    assert str(caught.value) == (f"{notes}:3: unit address 'mlp/1/50': no unit 50 in mlp layer 1, which has units "
                                 "0-49; fix it, or pass skip_unknown to leave out rows of units the store does "
                                 "not hold")
    assert rows(store) == []  # all or nothing
    summary = annotate(store, notes, skip_unknown=True)
    assert rows(store, "unit, text") == [(3, "fine")]
    assert (summary.added, summary.unknown) == (1, 2)
    assert summary.line().endswith(f"skipped 2 for units not in the store (the first: {notes}:3)")


@pytest.mark.parametrize("name, content, message", [
    ("a.csv", "unit,text\nmlp/1/3,ok\nmlp/1/4,\n", ":3: no explanation text; give it in a `text` field"),
    ("a.csv", "unit,text\nmlp/1/3,ok\nmlp/1/4,   \n", ":3: no explanation text"),
    ("a.csv", "unit,text,score\nmlp/1/4,x,high\n", ":2: score 'high' is not a finite number"),
    ("a.csv", "unit,text,score\nmlp/1/4,x,nan\n", ":2: score 'nan' is not a finite number"),
    ("a.csv", "unit,text\nmlp/1/4,x,extra\n", ":2: 3 fields but the header has 2; quote fields"),
    ("a.csv", "unit,note\nmlp/1/4,x\n", ":1: the header has no text column; name it one of text, explanation"),
    ("a.csv", "unit,text,text\nmlp/1/4,x,y\n", ":1: column 'text' appears twice"),
    ("a.csv", "layer,unit,text\n1,-4,x\n", ":2: unit '-4' is not a unit or layer number"),
    ("a.csv", "layer,unit,text\none,4,x\n", ":2: layer 'one' is not a unit or layer number"),
    ("a.csv", "source,text\nmlp,x\n", ":2: no unit; give an `address` or `unit` column"),
    ("a.csv", "unit,text\nneuron twelve,x\n", ":2: unit address 'neuron twelve' cannot be read"),
    ("a.csv", "unit,text\n12/3/4/5,x\n", ":2: unit address '12/3/4/5' cannot be read"),
    ("a.csv", "unit,text\nmlp/4,x\n", ":2: unit address 'mlp/4' names no layer, and mlp has layers 0-1"),
    ("a.csv", "unit,text\nmlp/1/1,\"" + "x" * 140_000 + "\"\n", ":2: not valid CSV (field larger than field limit"),
    ("a.jsonl", '{"unit": "mlp/1/1", "text": "ok"}\n{"unit": "mlp/1/2", "text": "x"\n', ":2: not valid JSON"),
    ("a.jsonl", '{"unit": "mlp/1/1", "text": "ok"}\n\n["mlp/1/2", "x"]\n', ":3: a JSON list, not an object"),
    ("a.jsonl", '{"unit": "mlp/1/1", "text": 5}\n', ":1: the explanation 5 is not text"),
    ("a.jsonl", '{"unit": 5, "text": "x"}\n', ":1: unit '5' names no layer, and the store has layers 0-1"),
    ("a.jsonl", '{"layer": true, "unit": 5, "text": "x"}\n', ":1: layer 'True' is not a unit or layer number"),
    ("a.jsonl", '{"unit": "mlp/1/1", "text": "x", "score": true}\n', ":1: score 'True' is not a finite number"),
    ("a.jsonl", '{"unit": "mlp/1/1", "text": "x", "score": Infinity}\n', ":1: score 'inf' is not a finite"),
    ("a.jsonl", '{"unit": "mlp/1/1", "text": "x", "author": ["a"]}\n', ":1: author \"['a']\" is not a name"),
    ("a.jsonl", '{"unit": "mlp/1/1", "text": "' + "x" * 20_001 + '"}\n', ":1: an explanation of 20,001 characters"),
    ("a.jsonl", '{"modelId": "g", "layer": "res-jb", "index": "1", "description": "x"}\n',
     ":1: Neuronpedia layer 'res-jb' is not LAYER-SET"),
    ("a.jsonl", '{"modelId": "g", "layer": "1-res", "index": "1", "description": "x", "scores": 3}\n',
     ":1: `scores` is not a list"),
    ("a.json", '[{"unit": "mlp/1/1", "text": "ok"}, {"unit": "mlp/1/2"}]', ": row 2: no explanation text"),
    ("a.json", '{"unit": "mlp/1/1",\n "text": "ok",,}', ":2: not valid JSON"),
    ("a.json", "[" * 100_000, ": JSON nested too deeply"),
    ("a.csv", "", ": empty; a .csv file needs a header line"),
])
def test_a_bad_row_gets_one_line_and_nothing_is_added(store: Path, tmp_path: Path, name: str, content: str,
                                                      message: str) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(AnnotationError) as caught:
        annotate(store, path)
    text = str(caught.value)
    assert text.startswith(str(path)) and message in text, text
    assert "\n" not in text and len(text) < 400
    assert rows(store) == []


def test_unreadable_inputs(store: Path, tmp_path: Path) -> None:
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(b"unit,text\nmlp/1/1,caf\xe9\n")
    with pytest.raises(AnnotationError, match=r"latin1\.csv:2: not UTF-8 \(byte 0xe9 at offset 21\); save"):
        annotate(store, bad)
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(b"not gzip")
    with pytest.raises(AnnotationError, match=r"x\.jsonl\.gz: not a valid gzip file"):
        annotate(store, gz)
    with pytest.raises(AnnotationError, match=r"missing\.csv: no such file or folder"):
        annotate(store, tmp_path / "missing.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnnotationError, match=r"empty: holds no delphi explanation files"):
        annotate(store, tmp_path / "empty")
    write(tmp_path / "run" / "run_config.json", "{}")  # a delphi run that explained nothing
    (tmp_path / "run" / "explanations").mkdir()
    with pytest.raises(AnnotationError, match=r"run: holds no delphi explanation files"):
        annotate(store, tmp_path / "run")
    write(tmp_path / "d" / "layers.1_latent2.txt", "Plain text, not JSON")
    with pytest.raises(AnnotationError, match=r"layers\.1_latent2\.txt: not valid JSON .* one JSON string"):
        annotate(store, tmp_path / "d", sources=["sae:res"])
    write(tmp_path / "d" / "layers.1_latent2.txt", '["a list"]')
    with pytest.raises(AnnotationError, match=r"layers\.1_latent2\.txt: holds a JSON list, not the string"):
        annotate(store, tmp_path / "d", sources=["sae:res"])
    write(tmp_path / "d" / "layers.1_latent2.txt", '"fine"')
    write(tmp_path / "scores" / "detection" / "layers.1_latent2.txt", '{"not": "a list"}')
    with pytest.raises(AnnotationError, match=r"detection/layers\.1_latent2\.txt: not a delphi score file"):
        annotate(store, tmp_path / "d", sources=["sae:res"])
    write(tmp_path / "e.jsonl", "\n\n")
    with pytest.raises(AnnotationError, match=r"e\.jsonl: holds no explanations"):
        annotate(store, tmp_path / "e.jsonl")
    assert rows(store) == []


def test_bad_options(store: Path, tmp_path: Path) -> None:
    notes = write(tmp_path / "n.csv", "unit,text\nmlp/1/1,x\n")
    for kwargs, message in [({"sources": ["sae:nope"]}, "sources 'sae:nope': .* has no such source; it has mlp"),
                            ({"sources": ["a=sae:nope"]}, "sources 'a=sae:nope': .* has no source 'sae:nope'"),
                            ({"sources": ["mlp", "resid"]}, "a default source \\('mlp'\\) was given already"),
                            ({"model": "other"}, "model 'other': .* holds no such model; it holds 'm'"),
                            ({"author": " "}, "author ' ': give a name of 1 to 200 characters")]:
        with pytest.raises(AnnotationError, match=message):
            annotate(store, notes, **kwargs)


def test_not_a_store_is_refused(tmp_path: Path) -> None:
    notes = write(tmp_path / "n.csv", "unit,text\nmlp/1/1,x\n")
    with pytest.raises(StoreError, match="no such store"):
        annotate(tmp_path / "none.duckdb", notes)
    with pytest.raises(StoreError, match=r"n\.csv: not a featureatlas store \(.*\); pass a \.duckdb file"):
        annotate(notes, notes)
    other = tmp_path / "other.duckdb"
    sql(other, "CREATE TABLE t (x INTEGER)")
    with pytest.raises(StoreError, match="not a featureatlas store"):
        annotate(other, notes)
    con = duckdb.connect(str(other), read_only=True)
    assert con.execute("SELECT table_name FROM information_schema.tables").fetchall() == [("t",)]
    con.close()


# ---- re-runs, --replace, old stores, hostile text ------------------------------------------------------------

def test_rerun_adds_nothing_and_replace_reloads_the_file(store: Path, tmp_path: Path) -> None:
    notes = write(tmp_path / "notes.csv", "unit,text,author\nmlp/1/1,one,a\nmlp/1/2,two,\nmlp/1/2,two,\n")
    first = annotate(store, notes)
    assert (first.added, first.units, first.duplicates) == (2, 2, 1)  # the repeated row counts once
    again = annotate(store, notes)
    assert (again.added, again.duplicates) == (0, 3)
    assert again.line() == f"added 0 explanations of 0 units from notes.csv to {store}; 3 already there"
    assert annotate(store, notes, author="b").added == 2  # another author's identical text is another explanation
    other = write(tmp_path / "other.jsonl", '{"unit": "mlp/1/1", "text": "kept"}\n')
    annotate(store, other)
    assert len(rows(store)) == 5
    write(notes, "unit,text\nmlp/1/3,three\n")  # the file, edited
    summary = annotate(store, notes, replace=True)
    assert (summary.replaced, summary.added) == (4, 1)
    assert "replaced 4 loaded earlier from notes.csv" in summary.line()
    assert rows(store, "unit, text, file") == [(1, "kept", "other.jsonl"), (3, "three", "notes.csv")]
    assert annotate(store, notes, replace=True).added == 1  # replacing with the same rows puts them back


def test_store_written_before_explanations(store: Path, tmp_path: Path) -> None:
    sql(store, "DROP VIEW explanations")
    sql(store, "DROP TABLE t_explanations")
    con = open_store(store)
    assert con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name LIKE '%explanations'"
                       ).fetchone()[0] == 0
    con.close()
    annotate(store, write(tmp_path / "n.csv", "unit,text\nmlp/1/1,x\n"))
    assert rows(store) == [("mlp", 1, 1, "x", None, None, None)]
    con = duckdb.connect(str(store), read_only=True)
    assert con.execute("SELECT value FROM t_meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    assert [r[0] for r in con.execute("DESCRIBE explanations").fetchall()] == [
        "model", "source", "layer", "unit", "text", "score", "score_kind", "author", "file", "added_at"]
    con.close()


def test_new_stores_have_an_empty_explanations_view(template: Path) -> None:
    assert rows(template) == []


def test_a_failed_write_changes_nothing(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    annotate(store, write(tmp_path / "n.csv", "unit,text\nmlp/1/1,x\n"))

    def broken(con: duckdb.DuckDBPyConnection) -> None:  # deletes, then fails as a full disk would
        ensure_explanations(con)
        con.execute("DELETE FROM t_explanations")
        raise duckdb.IOException("No space left on device")

    monkeypatch.setattr(annotate_module, "ensure_explanations", broken)
    with pytest.raises(StoreError, match="could not add the explanations .*; the store is unchanged"):
        annotate(store, write(tmp_path / "n.csv", "unit,text\nmlp/1/2,y\n"), replace=True)
    assert rows(store, "unit, text") == [(1, "x")]


def test_hostile_text_is_stored_verbatim(store: Path, tmp_path: Path) -> None:
    author = "<b>eve</b>\u202e\x00"
    jsonl(tmp_path / "hostile.jsonl", [{"unit": f"mlp/1/{i}", "text": t, "author": author, "score_kind": t[:30]}
                                       for i, t in enumerate(HOSTILE)])
    annotate(store, tmp_path / "hostile.jsonl")
    with (tmp_path / "hostile.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["unit", "text"])
        writer.writerows([f"resid/0/{i}", t] for i, t in enumerate(HOSTILE))
    annotate(store, tmp_path / "hostile.csv")
    assert rows(store, "unit, text, author, score_kind", "source = 'mlp'") == sorted(
        (i, t, author, t[:30].strip()) for i, t in enumerate(HOSTILE))
    assert rows(store, "unit, text", "source = 'resid'") == sorted(enumerate(HOSTILE))
    # an address full of control characters is refused with it escaped, on one line
    jsonl(tmp_path / "evil.jsonl", [{"unit": "mlp/1/\u202e1\n2\x00", "text": "x"}])
    with pytest.raises(AnnotationError) as caught:
        annotate(store, tmp_path / "evil.jsonl")
    assert "'mlp/1/\\u202e1\\n2\\x00' cannot be read" in str(caught.value) and "\n" not in str(caught.value)


def test_several_models(two_models: Path, tmp_path: Path) -> None:
    store = Path(shutil.copy(two_models, tmp_path / "s.duckdb"))
    notes = write(tmp_path / "n.csv", "unit,text\nb/c::mlp/1/1,prefixed\n")
    annotate(store, notes)
    jsonl(tmp_path / "cols.jsonl", [{"model": "a", "layer": 0, "unit": 2, "text": "columns"}])
    annotate(store, tmp_path / "cols.jsonl")
    write(tmp_path / "bare.csv", "unit,text\nmlp/1/3,bare\n")
    with pytest.raises(AnnotationError, match=r"bare\.csv:2: .*ambiguous: mlp layer 1 is in models 'a', 'b/c'"):
        annotate(store, tmp_path / "bare.csv")
    annotate(store, tmp_path / "bare.csv", model="a")
    jsonl(tmp_path / "np.jsonl", [{"modelId": "B/C", "layer": "1-res", "index": "5", "description": "np"}])
    annotate(store, tmp_path / "np.jsonl", sources=["sae:res"])  # modelId matched case-insensitively
    assert rows(store, "model, source, layer, unit, text") == [
        ("a", "mlp", 0, 2, "columns"), ("a", "mlp", 1, 3, "bare"), ("b/c", "mlp", 1, 1, "prefixed"),
        ("b/c", "sae:res", 1, 5, "np")]


# ---- the command line ----------------------------------------------------------------------------------------

def test_cli(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    notes = write(tmp_path / "notes.csv", "unit,text\nmlp/1/1,x\nsae:res 7,y\n")
    assert main(["annotate", str(store), "--explanations", str(notes), "--author", "alice"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"added 2 explanations of 2 units from notes.csv to {store}"
    assert main(["annotate", str(store), "--explanations", str(notes), "--author", "alice", "--replace"]) == 0
    assert "replaced 2" in capsys.readouterr().out
    write(notes, "unit,text\nmlp/1/99,x\n")
    assert main(["annotate", str(store), "--explanations", str(notes)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"featureatlas annotate: error: {notes}:2: unit address 'mlp/1/99': no unit 99 in mlp layer 1, "
                   "which has units 0-49; fix it, or pass --skip-unknown to leave out rows of units the store does "
                   "not hold"]
    assert main(["annotate", str(store), "--explanations", str(notes), "--skip-unknown"]) == 0
    assert "skipped 1 for units not in the store" in capsys.readouterr().out
    assert main(["annotate", str(store), "--explanations", str(notes), "--source", "sae:nope"]) == 2
    assert "error: --source 'sae:nope': " in capsys.readouterr().err  # the library's `sources`, as its flag
    delphi = delphi_run(tmp_path)
    assert main(["annotate", str(store), "--explanations", str(delphi), "--source", "sae:res"]) == 0
    assert capsys.readouterr().out.startswith("added 2 explanations of 2 units from run1/explanations to")
    assert main(["annotate", str(notes), "--explanations", str(notes)]) == 2
    assert "not a featureatlas store" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["annotate", "--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    assert "--skip-unknown" in help_text and "sae:res14 123" in help_text and "examples:" in help_text
    assert len(rows(store)) == 4
