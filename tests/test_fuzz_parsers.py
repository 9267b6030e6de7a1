"""Property-based fuzzing of every parser users feed files to: corpus files (.jsonl plain and compressed, .txt,
.parquet, .arrow, saved-dataset metadata), explanation files for `annotate` (.csv, .tsv, .jsonl, .json, gzip,
delphi and Neuronpedia rows), unit addresses, and dictionary configs (SAELens and sparsify cfg.json). For any input
the only exception let out is the format's one-line error (CorpusError, AnnotationError or AddressError,
DictionaryError), with a message of one short line; anything else (a KeyError, a ValueError from int(), a
RecursionError) would reach the user as a traceback."""

from __future__ import annotations

import gzip
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from featureatlas.annotate.explanations import AnnotationError, StoreSource, _Context, read_explanations
from featureatlas.load.corpus import CorpusError, iter_documents
from featureatlas.load.dictionaries import DictionaryError, load_dictionaries
from featureatlas.store.addresses import AddressError, format_address, parse_address

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_MESSAGE = 1000  # characters: a message quotes values cut short, never a whole hostile value


@contextmanager
def folder() -> Iterator[Path]:
    """A fresh folder per example (pytest's tmp_path is one per test, shared by all of Hypothesis's examples)."""
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def only(errors: type[Exception] | tuple[type[Exception], ...], action: Callable[[], object]) -> None:
    """Runs action; it may raise only `errors`, with one short line."""
    try:
        action()
    except errors as err:
        message = str(err)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        assert len(message) < MAX_MESSAGE, message[:300]


# JSON values, skewed towards what the parsers look at: the field names they know, and odd numbers and strings.
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**30), max_value=10**30)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
           | st.sampled_from(["", " ", "mlp/1/3", "L1N3", "0", "-1", "1e999", "\u202e", "\x00", "12-res-jb"]))


def json_values(keys: list[str]) -> st.SearchStrategy:
    scalars = SCALARS | st.sampled_from(["1" * 5000 + "-res-jb", "\u0663-res-jb", "1-" + "x" * 3000])
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), inner, max_size=6),
                        max_leaves=12)


def json_lines(values: st.SearchStrategy) -> st.SearchStrategy[bytes]:
    """Lines of JSON (and some junk), as one file's bytes."""
    line = (values.map(lambda v: json.dumps(v, allow_nan=True).encode())
            | st.binary(max_size=40)
            | st.sampled_from([b"", b"\xef\xbb\xbf{}", b"[" * 5000, b'{"text": 1' + b"0" * 5000 + b"}",
                               b'{"input_ids": [1, 2, 3' + b", 7" * 50 + b"]}", b'{"text": "\\ud800"}']))
    return st.lists(line, max_size=8).map(lambda lines: b"\n".join(lines))


# ---- corpus --------------------------------------------------------------------------------------------------

CORPUS_KEYS = ["text", "input_ids", "tokens", "body"]


def compressed(data: bytes, suffix: str, cut: int | None) -> bytes:
    if suffix == ".jsonl.gz":
        data = gzip.compress(data)
    elif suffix == ".jsonl.zst":
        data = zstandard.ZstdCompressor().compress(data)
    return data if cut is None else data[:cut]


@FUZZ
@given(data=json_lines(json_values(CORPUS_KEYS)) | st.binary(max_size=300),
       suffix=st.sampled_from([".jsonl", ".jsonl.gz", ".jsonl.zst", ".txt"]),
       cut=st.none() | st.integers(min_value=0, max_value=200), token_field=st.sampled_from([None, "input_ids"]))
def test_corpus_files(data: bytes, suffix: str, cut: int | None, token_field: str | None) -> None:
    with folder() as tmp:
        file = tmp / f"c{suffix}"
        file.write_bytes(compressed(data, suffix, cut))
        only(CorpusError, lambda: list(iter_documents(file, token_field=token_field)))


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".parquet", ".arrow"]))
def test_corpus_columnar_files(data: bytes, suffix: str) -> None:
    with folder() as tmp:
        (tmp / f"c{suffix}").write_bytes(data)
        only(CorpusError, lambda: list(iter_documents(tmp / f"c{suffix}")))


@FUZZ
@given(state=json_values(["_data_files", "filename", "splits"]), splits=json_values(["splits"]),
       names=st.lists(st.sampled_from(["data.arrow", "../x.arrow", "/etc/passwd", "", ".", "..", "a/b.arrow",
                                       "x.txt", "data.arrow\x00"]) | st.text(max_size=10), max_size=3))
def test_saved_dataset_metadata(state: object, splits: object, names: list) -> None:
    with folder() as tmp:
        saved = tmp / "saved"
        saved.mkdir()
        (saved / "state.json").write_text(json.dumps(state))
        listed = tmp / "listed"
        listed.mkdir()
        (listed / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
        both = tmp / "dict"
        both.mkdir()
        (both / "dataset_dict.json").write_text(json.dumps(splits))
        for path in (saved, listed, both):
            only(CorpusError, lambda path=path: list(iter_documents(path)))


# ---- explanation files ---------------------------------------------------------------------------------------

ANNOTATE_KEYS = ["unit", "address", "text", "explanation", "description", "layer", "source", "model", "index",
                 "feature", "latent", "score", "score_kind", "author", "modelId", "explanations", "scores", "value",
                 "scoreV2", "explanationModelName", "explanationScoreTypeName"]
STORE = [StoreSource("m", "mlp", 0, 50, "mlp", "blocks.0.mlp", None),
         StoreSource("m", "mlp", 1, 50, "mlp", "blocks.1.mlp", None),
         StoreSource("m", "sae:res", 1, 100, "sae", "blocks.1.hook_resid_post", "gpt2-small/1-res-jb"),
         StoreSource("other", "mlp", 1, 8, "mlp", "blocks.1.mlp", None)]


def locate_all(path: Path, sources: list[str], model: str | None) -> None:
    """What annotate does before it writes: read every record and find its unit among the store's sources."""
    context = _Context(STORE, Path("store.duckdb"))
    context.set_options(sources, model)
    for record in read_explanations(path):
        context.locate(record)


def csv_text(rows: list[list[str]], delimiter: str) -> bytes:
    import csv
    import io

    out = io.StringIO()
    csv.writer(out, delimiter=delimiter).writerows(rows)
    return out.getvalue().encode()


def rows() -> st.SearchStrategy:
    """Explanation rows that get past the first checks: a text, and some of the other fields."""
    cell = json_values(ANNOTATE_KEYS)
    generic = st.fixed_dictionaries({"text": st.text(max_size=20) | cell},
                                    optional={k: cell | CELLS for k in ANNOTATE_KEYS if k != "text"})
    neuronpedia = st.fixed_dictionaries({"modelId": st.sampled_from(["m", "gpt2-small"]) | cell,
                                         "layer": st.sampled_from(["1-res-jb", "1-res", "0-x"]) | cell,
                                         "index": st.integers(-2, 120) | cell, "description": st.text(max_size=9)},
                                        optional={"scores": cell, "explanations": st.lists(cell, max_size=3)})
    return generic | neuronpedia


def csv_files() -> st.SearchStrategy[bytes]:
    header = st.lists(st.sampled_from(["unit", "text", "layer", "source", "score", "author", "model", "address"]),
                      min_size=1, max_size=6, unique=True)
    return st.tuples(header, st.lists(st.lists(CELLS, max_size=6), max_size=6),
                     st.sampled_from([",", "\t"])).map(lambda h: csv_text([h[0], *h[1]], h[2]))


CELLS = st.sampled_from(["unit", "text", "layer", "source", "score", "author", "mlp/1/3", "1", "x", "", "nan",
                         "9" * 5000, "\u00b2", "\u0663"]) | st.text(max_size=12)


@FUZZ
@given(data=json_lines(json_values(ANNOTATE_KEYS) | rows()) | st.binary(max_size=300) | csv_files()
       | st.lists(rows(), max_size=4).map(lambda r: json.dumps(r).encode()),
       name=st.sampled_from(["a.jsonl", "a.json", "a.csv", "a.tsv", "a.ndjson", "a.jsonl.gz", "a.csv.gz", "a.txt",
                             "notes", "layers.1_latent3.txt"]),
       options=st.sampled_from([([], None), (["mlp"], None), (["sae:res"], "m"), (["1-res-jb=sae:res"], None)]))
def test_explanation_files(data: bytes, name: str, options: tuple[list[str], str | None]) -> None:
    with folder() as tmp:
        file = tmp / name
        file.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        only((AnnotationError, AddressError), lambda: locate_all(file, *options))


@FUZZ
@given(explanation=json_values(["text"]), scores=json_values(["correct"]), config=json_values(["explainer_model",
                                                                                                  "model"]))
def test_delphi_folders(explanation: object, scores: object, config: object) -> None:
    with folder() as tmp:
        (tmp / "explanations").mkdir()
        (tmp / "explanations" / "blocks.1.hook_resid_post_latent7.txt").write_text(json.dumps(explanation))
        (tmp / "scores" / "detection").mkdir(parents=True)
        (tmp / "scores" / "detection" / "blocks.1.hook_resid_post_latent7.txt").write_text(json.dumps(scores))
        (tmp / "run_config.json").write_text(json.dumps(config))
        only((AnnotationError, AddressError), lambda: locate_all(tmp, [], None))


# ---- unit addresses ------------------------------------------------------------------------------------------

ADDRESS_SOURCES = [("m", "mlp", 0, 50), ("m", "mlp", 12, 1536), ("m", "resid", 3, 576), ("m", "sae:res14", 14, 4096),
                   ("m", "sae:wide", 2, 10), ("m", "sae:wide", 4, 10), ("x::y", "mlp", 12, 9)]
ADDRESS_PARTS = st.sampled_from(["m::", "x::y::", "::", "mlp", "resid", "sae:res14", "sae:wide", "sae:", "L", "N",
                                 "l", "n", "/", " ", "\t", "\u3000", "0", "12", "345", "9" * 30, "0" * 5000 + "1",
                                 "٣", "²", "-", "\n"])


@FUZZ
@given(text=st.lists(ADDRESS_PARTS, max_size=8).map("".join) | st.text(max_size=40),
       default=st.sampled_from([None, "mlp", "sae:wide", "nope"]))
def test_unit_addresses(text: str, default: str | None) -> None:
    only(AddressError, lambda: parse_address(text, ADDRESS_SOURCES, default_source=default))


@FUZZ
@given(source=st.sampled_from(ADDRESS_SOURCES), unit=st.integers(min_value=0, max_value=5000))
def test_formatted_addresses_read_back(source: tuple, unit: int) -> None:
    model, name, layer, n_units = source
    address = format_address(model, name, layer, unit, with_model=True)
    if unit < n_units:
        assert parse_address(address, ADDRESS_SOURCES) == (model, name, layer, unit)
    else:
        only(AddressError, lambda: parse_address(address, ADDRESS_SOURCES))


# ---- dictionary configs --------------------------------------------------------------------------------------

D_IN, D_SAE = 4, 8
CONFIG_KEYS = ["architecture", "d_in", "d_sae", "d_out", "dtype", "k", "apply_b_dec_to_input",
               "normalize_activations", "reshape_activations", "metadata", "hook_name", "hook_name_out",
               "hook_head_index", "model_class_name", "model_from_pretrained_kwargs", "sae_lens_version",
               "hook_point", "activation_fn", "activation_fn_str", "activation_fn_kwargs", "finetuning_scaling_factor",
               "rescale_acts_by_decoder_norm", "signed", "activation", "transcode", "skip_connection", "num_latents",
               "expansion_factor", "sae", "scaling_factor", "has_whitening"]
CONFIG_VALUES = st.sampled_from(["standard", "jumprelu", "topk", "batchtopk", "gated", "transcoder", "float32",
                                 "torch.bfloat16", "none", "layer_norm", "hook_z", "blocks.0.hook_z",
                                 "blocks.0.hook_resid_post", "6.1.0", "5.0", "9" * 40, "relu", "groupmax",
                                 "AutoModelForCausalLM", "9" * 5000, D_IN, D_SAE, 2, 0, -1, True, False, None])


def config_dicts() -> st.SearchStrategy[dict]:
    values = st.recursive(CONFIG_VALUES | SCALARS, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.sampled_from(CONFIG_KEYS), inner, max_size=6), max_leaves=16)
    return st.dictionaries(st.sampled_from(CONFIG_KEYS), values, max_size=12)


def weights(format: str) -> dict[str, torch.Tensor]:
    if format == "saelens":
        return {"W_enc": torch.zeros(D_IN, D_SAE), "W_dec": torch.zeros(D_SAE, D_IN), "b_dec": torch.zeros(D_IN),
                "b_enc": torch.zeros(D_SAE)}
    return {"encoder.weight": torch.zeros(D_SAE, D_IN), "encoder.bias": torch.zeros(D_SAE),
            "W_dec": torch.zeros(D_SAE, D_IN), "b_dec": torch.zeros(D_IN)}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("weights")
    for format in ("saelens", "sparsify"):
        save_file(weights(format), str(out / format))
    return {format: (out / format).read_bytes() for format in ("saelens", "sparsify")}


@settings(FUZZ, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cfg=config_dicts() | json_values(CONFIG_KEYS) | st.binary(max_size=200)
       | st.sampled_from([b'{"d_in": 1' + b"0" * 5000 + b"}", b"[" * 5000, b"\xff{}", b""]),
       format=st.sampled_from(["saelens", "sparsify"]), name=st.sampled_from(["layers.1", "\u00b2", "layers.\u0663"]),
       extra=st.sampled_from([None, "activation_scaler.json", "../config.json"]), extra_cfg=config_dicts())
def test_dictionary_configs(weight_files: dict[str, bytes], cfg: object, format: str, name: str, extra: str | None,
                            extra_cfg: dict) -> None:
    with folder() as tmp:
        sae = tmp / "run" / name
        sae.mkdir(parents=True)
        (sae / "cfg.json").write_bytes(cfg if isinstance(cfg, bytes) else json.dumps(cfg).encode())
        (sae / ("sae_weights.safetensors" if format == "saelens" else "sae.safetensors")).write_bytes(
            weight_files[format])
        if extra is not None:
            (sae / extra).write_text(json.dumps(extra_cfg))
        only(DictionaryError, lambda: load_dictionaries(sae))
        only(DictionaryError, lambda: load_dictionaries(sae.parent))  # a run folder: its folders sorted by name
