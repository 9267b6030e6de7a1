"""The cache of converted .gguf models: written whole or not at all, used on later loads instead of the .gguf,
rebuilt when damaged, skipped on request, and bit for bit the model the .gguf load gives. On a tiny LLaMA .gguf
written here with the `gguf` package, quantised as the embedded model is (Q4_1 matrices, Q8_0 embeddings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import gguf
import numpy as np
import pytest
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from featureatlas.cli import COMMANDS, main
from featureatlas.harvest import native
from featureatlas.load import models
from featureatlas.load.models import (
    ModelRef,
    load_model,
    model_cache_dir,
    model_cache_disabled,
    model_cache_enabled,
    model_cache_entry,
    resolve_model,
)

from helpers.tiny_models import write_corpus

CPU = torch.device("cpu")
TEXT = "the cat in the hat, <|im_start|> To be or not to be"
CACHED = "cached the converted model in"
IGNORED = "ignoring the unreadable model cache entry"


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer LLaMA with a byte-level BPE tokenizer (256 bytes, 3 specials, 5 merges), as llama.cpp names it."""
    hidden, layers, heads, kv_heads, ff = 64, 2, 4, 2, 128
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(),
              *(m.replace(" ", "") for m in merges)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    rng = np.random.default_rng(seed)
    q4_1, q8_0, f32 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32

    def add(name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> None:
        data = (rng.standard_normal(shape) * (1.0 if qtype == f32 else 0.3)).astype(np.float32)
        w.add_tensor(name, data if qtype == f32 else gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", (len(tokens), hidden), q8_0)
    add("output_norm.weight", (hidden,), f32)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), f32)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), f32)
        for name, rows, cols in [("attn_q", hidden, hidden), ("attn_k", hidden // 2, hidden),
                                 ("attn_v", hidden // 2, hidden), ("attn_output", hidden, hidden),
                                 ("ffn_gate", ff, hidden), ("ffn_up", ff, hidden), ("ffn_down", hidden, ff)]:
            add(f"blk.{i}.{name}.weight", (rows, cols), q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "Tiny-LLaMA.Q4_1.gguf")


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never the real ~/.cache (the native loops are loaded from it first: a fresh cache would build them again)."""
    native.library()
    monkeypatch.setenv("FEATUREATLAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEATUREATLAS_NO_MODEL_CACHE", raising=False)
    return tmp_path / "cache" / "models"


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the loads that go to the .gguf itself (transformers' GGUF parser and dequantisation)."""
    calls: list[str] = []
    original = models._load_from_source

    def counted(ref: ModelRef, dtype: torch.dtype):
        calls.append(ref.gguf_file or ref.location)
        return original(ref, dtype)

    monkeypatch.setattr(models, "_load_from_source", counted)
    return calls


def load(path: Path, dtype: torch.dtype = torch.float32):
    return load_model(resolve_model(str(path)), CPU, dtype)


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(tokenizer(TEXT, return_tensors="pt")["input_ids"]).logits


def stderr_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return capsys.readouterr().err.splitlines()


@pytest.mark.model
def test_first_load_writes_the_entry_atomically_and_the_second_uses_it(
        tiny_gguf: Path, cache_in_tmp: Path, conversions: list[str], capsys, monkeypatch) -> None:
    entry = model_cache_entry(tiny_gguf, torch.float32)
    assert entry.parent == cache_in_tmp and entry.name.startswith("Tiny-LLaMA.Q4_1-float32-")
    published = []
    original_publish = models._publish

    def publish(staging: Path, target: Path, replace: bool) -> None:
        assert not target.exists()  # nothing at the entry's path until the whole folder is renamed there
        assert staging.parent == target.parent and staging.name.startswith(f".{target.name}.")
        assert (staging / "featureatlas-model-cache.json").is_file()  # complete, manifest last
        published.append(staging)
        original_publish(staging, target, replace)

    monkeypatch.setattr(models, "_publish", publish)
    first = load(tiny_gguf)
    assert conversions == ["Tiny-LLaMA.Q4_1.gguf"] and len(published) == 1
    assert [p.name for p in cache_in_tmp.iterdir()] == [entry.name]  # no temporary folder left
    manifest = json.loads((entry / "featureatlas-model-cache.json").read_text())
    assert manifest["dtype"] == "float32" and "model.safetensors" in manifest["files"]
    assert "tokenizer.json" in manifest["files"] and "config.json" in manifest["files"]
    assert [line for line in stderr_lines(capsys) if "featureatlas:" in line] == [
        f"featureatlas: {CACHED} {entry}; later runs load it in seconds (--no-model-cache skips the cache)"]

    monkeypatch.setattr(models, "_load_from_source", lambda *a: pytest.fail("the .gguf was parsed again"))
    second = load(tiny_gguf)
    assert "featureatlas:" not in capsys.readouterr().err
    assert torch.equal(logits(*first), logits(*second))


@pytest.mark.model
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cached_model_is_bit_for_bit_the_gguf_load(tiny_gguf: Path, conversions: list[str], dtype) -> None:
    with model_cache_disabled():
        reference, ref_tokenizer = load(tiny_gguf, dtype)
    load(tiny_gguf, dtype)  # converts and writes the entry
    model, tokenizer = load(tiny_gguf, dtype)  # reads it
    assert len(conversions) == 2  # the reference and the first cached load; not the third
    assert model.dtype == reference.dtype == dtype
    expected, got = reference.state_dict(), model.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    buffers = dict(model.named_buffers())
    for name, buffer in reference.named_buffers():
        assert buffers[name].dtype == buffer.dtype and torch.equal(buffers[name], buffer), name
    assert torch.equal(logits(model, tokenizer), logits(reference, ref_tokenizer))
    assert model.config.to_dict() == reference.config.to_dict()  # name_or_path included: the .gguf's folder
    assert model.generation_config.to_dict() == reference.generation_config.to_dict()
    assert tokenizer(TEXT)["input_ids"] == ref_tokenizer(TEXT)["input_ids"]
    assert tokenizer.get_vocab() == ref_tokenizer.get_vocab()
    for attribute in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "pad_token_id",
                      "chat_template", "name_or_path"):
        assert getattr(tokenizer, attribute) == getattr(ref_tokenizer, attribute), attribute


@pytest.mark.model
def test_each_dtype_has_its_own_entry(tiny_gguf: Path, cache_in_tmp: Path) -> None:
    """bfloat16 dequantisation is not float32's rounded, so one entry cannot serve both bit for bit."""
    load(tiny_gguf, torch.float32)
    load(tiny_gguf, torch.bfloat16)
    assert sorted(p.name.split("-")[2] for p in cache_in_tmp.iterdir()) == ["bfloat16", "float32"]


def _truncate(entry: Path) -> None:
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _same_size_garbage(entry: Path) -> None:  # passes the manifest's size check, fails to parse
    config = entry / "config.json"
    config.write_bytes(b"\xff" * config.stat().st_size)


@pytest.mark.model
@pytest.mark.parametrize("damage", [
    _truncate,
    _same_size_garbage,
    lambda entry: (entry / "tokenizer.json").unlink(),
    lambda entry: (entry / "featureatlas-model-cache.json").unlink(),  # as a folder copied in half would be
    lambda entry: (entry / "featureatlas-model-cache.json").write_text("{not json"),
], ids=["truncated-weights", "garbage-config", "missing-tokenizer", "no-manifest", "bad-manifest"])
def test_a_damaged_entry_is_ignored_with_one_line_and_rebuilt(
        tiny_gguf: Path, cache_in_tmp: Path, conversions: list[str], capsys, damage) -> None:
    reference = logits(*load(tiny_gguf))
    entry = model_cache_entry(tiny_gguf, torch.float32)
    damage(entry)
    capsys.readouterr()
    model, tokenizer = load(tiny_gguf)
    lines = [line for line in stderr_lines(capsys) if "featureatlas:" in line]
    assert len(lines) == 2 and lines[0].startswith(f"featureatlas: {IGNORED} {entry} (") and CACHED in lines[1]
    assert len(conversions) == 2 and torch.equal(logits(model, tokenizer), reference)
    assert [p.name for p in cache_in_tmp.iterdir()] == [entry.name]  # replaced in place, nothing left over
    assert models._entry_problem(entry) is None
    assert torch.equal(logits(*load(tiny_gguf)), reference) and len(conversions) == 2  # the rebuilt one is used


@pytest.mark.model
def test_a_failed_write_costs_one_line_and_leaves_nothing(
        tiny_gguf: Path, cache_in_tmp: Path, conversions: list[str], capsys, monkeypatch) -> None:
    def disk_full(tokenizer, folder: Path) -> None:
        (folder / "tokenizer.json").write_text("{")  # half-written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "_save_tokenizer", disk_full)
    model, tokenizer = load(tiny_gguf)
    lines = [line for line in stderr_lines(capsys) if "featureatlas:" in line]
    assert len(lines) == 1 and "could not cache the converted model" in lines[0] and "No space left" in lines[0]
    assert list(cache_in_tmp.iterdir()) == []  # neither an entry nor a temporary folder
    assert logits(model, tokenizer).shape[-1] == len(tokenizer)


@pytest.mark.model
def test_what_a_killed_run_left_behind_is_never_used_and_is_removed(
        tiny_gguf: Path, cache_in_tmp: Path, conversions: list[str]) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    entry = model_cache_entry(tiny_gguf, torch.float32)
    partial = entry.with_name(f".{entry.name}.{dead.pid}.partial")
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    load(tiny_gguf)
    assert conversions == ["Tiny-LLaMA.Q4_1.gguf"] and not partial.exists()
    assert [p.name for p in cache_in_tmp.iterdir()] == [entry.name]


@pytest.mark.model
def test_an_entry_another_run_published_meanwhile_is_kept(tiny_gguf: Path, tmp_path: Path) -> None:
    """Two runs converting the same file at once: the second to finish leaves the first one's entry alone."""
    load(tiny_gguf)
    entry = model_cache_entry(tiny_gguf, torch.float32)
    before = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    models._publish(staging, entry, replace=False)
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == before


@pytest.mark.model
def test_environment_variable_skips_the_cache(tiny_gguf: Path, tmp_path: Path, conversions: list[str],
                                              monkeypatch, capsys) -> None:
    monkeypatch.setenv("FEATUREATLAS_NO_MODEL_CACHE", "1")
    assert not model_cache_enabled()
    load(tiny_gguf)
    load(tiny_gguf)
    assert len(conversions) == 2 and not (tmp_path / "cache").exists() and CACHED not in capsys.readouterr().err
    monkeypatch.setenv("FEATUREATLAS_NO_MODEL_CACHE", "0")
    assert model_cache_enabled()


@pytest.mark.model
def test_only_local_gguf_files_are_cached(tmp_path: Path, monkeypatch) -> None:
    """A folder saved with save_pretrained already loads fast: it is loaded as is, never copied."""
    monkeypatch.setattr(models, "_load_gguf_cached", lambda *a: pytest.fail("a folder went through the cache"))
    from helpers.tiny_models import save_tiny_model
    model, _ = load_model(resolve_model(str(save_tiny_model("llama", tmp_path / "model"))), CPU, torch.float32)
    assert model.config.model_type == "llama" and not (tmp_path / "cache").exists()


def test_cache_folder_follows_featureatlas_cache_then_xdg_then_home(tmp_path: Path, monkeypatch) -> None:
    assert model_cache_dir() == tmp_path / "cache" / "models"
    monkeypatch.delenv("FEATUREATLAS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache_dir() == tmp_path / "xdg" / "featureatlas" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec says so
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache_dir() == tmp_path / "home" / ".cache" / "featureatlas" / "models"


def harvest(model: Path, corpus: Path, out: Path, *extra: str) -> int:
    return main(["harvest", "--model", str(model), "--corpus", str(corpus), "--out", str(out), "--device", "cpu",
                 "--layers", "0-1", "--resid", "--top-k", "3", "--context-length", "16", "--tokens", "400",
                 "--compile", "off", "--dtype", "float32", *extra])


@pytest.mark.model
def test_harvest_flag_skips_the_cache_and_the_store_does_not_change_with_it(
        tiny_gguf: Path, tmp_path: Path, conversions: list[str], capsys) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    stores = [tmp_path / "converted.duckdb", tmp_path / "cached.duckdb"]
    assert harvest(tiny_gguf, corpus, stores[0], "--no-model-cache") == 0
    assert not (tmp_path / "cache").exists() and CACHED not in capsys.readouterr().err
    assert model_cache_enabled()  # the flag does not outlive its command
    load(tiny_gguf, torch.float32)  # writes the entry
    assert harvest(tiny_gguf, corpus, stores[1]) == 0
    assert len(conversions) == 2  # the --no-model-cache harvest and the load; the second harvest read the cache
    contents = []
    for store in stores:
        con = duckdb.connect(str(store), read_only=True)
        contents.append((
            con.execute("SELECT model, model_ref, model_type, dtype, bos_token FROM runs").fetchall(),
            con.execute("SELECT * FROM units ORDER BY ALL").fetchall(),
            con.execute("SELECT source, layer, unit, rank, context_id, activations FROM examples ORDER BY ALL")
            .fetchall(),
            con.execute("SELECT * FROM logit_effects ORDER BY ALL").fetchall()))
        con.close()
    assert contents[0][0] == [("Tiny-LLaMA", str(tiny_gguf), "llama", "float32", "<|im_start|>")]
    assert contents[0] == contents[1]  # the .gguf's name, not the cache's; every activation the same


@pytest.mark.model
def test_train_sae_flag_skips_the_cache(tiny_gguf: Path, tmp_path: Path, conversions: list[str]) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    assert main(["train-sae", "--model", str(tiny_gguf), "--corpus", str(corpus), "--hook",
                 "blocks.1.hook_resid_post", "--out", str(tmp_path / "sae"), "--features", "16", "--k", "2",
                 "--tokens", "300", "--steps", "3", "--context-length", "16", "--device", "cpu",
                 "--no-model-cache"]) == 0
    assert len(conversions) == 1 and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command", ["harvest", "train-sae", "demo"])
def test_every_model_loading_command_takes_the_flag(command: str, monkeypatch) -> None:
    seen = []
    monkeypatch.setitem(COMMANDS, command, lambda args: seen.append(model_cache_enabled()) or 0)
    required = {"harvest": ["--model", "m", "--corpus", "c", "--out", "o"], "demo": [],
                "train-sae": ["--model", "m", "--corpus", "c", "--hook", "h", "--out", "o"]}[command]
    assert main([command, *required, "--no-model-cache"]) == 0
    assert main([command, *required]) == 0
    assert seen == [False, True]
