"""Checkpoints as an attacker or an accident meets them: a pickle placed beside --out, a truncated or garbled
file, and a corpus, model or dictionary that changed between the crash and the resume. Each gets one line and
runs nothing; the previous checkpoint survives a save that fails."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
from dataclasses import make_dataclass
from datetime import datetime
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from featureatlas.cli import main
from featureatlas.errors import UsageError
from featureatlas.harvest import run as run_module
from featureatlas.harvest.checkpoint import FORMAT, VERSION, Checkpointer

from helpers.tiny_models import saelens_sae, save_tiny_model, write_corpus


class _CreatesFile:
    """Unpickling this calls open(path, 'w'): the file appearing is the proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return open, (self.path, "w")


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    """A model, a corpus and an SAE of this test's own, which it may change."""
    corpus = write_corpus(tmp_path / "corpus")
    return {"model": save_tiny_model("llama", tmp_path / "model"), "corpus": corpus,
            "sae": saelens_sae(tmp_path / "sae", 32, "blocks.1.hook_resid_post"), "out": tmp_path / "s.duckdb"}


def argv(inputs: dict[str, Path], *extra: str) -> list[str]:
    return ["harvest", "--model", str(inputs["model"]), "--corpus", str(inputs["corpus"]), "--out",
            str(inputs["out"]), "--device", "cpu", "--layers", "1", "--sae", str(inputs["sae"]), "--top-k", "3",
            "--batch-size", "2", "--context-length", "16", "--compile", "off", "--tokens", "200", *extra]


def interrupted_run(inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Leaves the checkpoint of a run that failed after its last batch (as a crash would); returns its path."""
    def fail(*args: object) -> None:
        raise RuntimeError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "_write_contexts", fail)
        with pytest.raises(RuntimeError):
            main(argv(inputs, "--checkpoint-every", "50"))
    checkpoint = inputs["out"].with_name("s.duckdb.checkpoint")
    assert checkpoint.is_file() and not inputs["out"].exists()
    return checkpoint


def refused(inputs: dict[str, Path], capsys: pytest.CaptureFixture) -> str:
    """Resumes; asserts it is refused with exactly one line, and returns that line."""
    assert main(argv(inputs, "--resume")) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # transformers' loading bar may come first
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("featureatlas harvest: error: "), lines
    err = errors[0]
    assert not inputs["out"].exists()
    return err


@pytest.mark.model
@pytest.mark.parametrize("wrapper", ["torch.save", "pickle"])
def test_a_pickled_checkpoint_is_refused_without_running_it(inputs, tmp_path: Path, capsys, wrapper: str) -> None:
    def payload(marker: Path) -> bytes:
        if wrapper == "pickle":
            return pickle.dumps({"version": 1, "evil": _CreatesFile(marker)})
        file = tmp_path / "payload.pt"
        torch.save({"version": 1, "evil": _CreatesFile(marker)}, file)
        return file.read_bytes()

    proof = tmp_path / "proof"  # what the old loader, torch.load(weights_only=False), did with such a file
    if wrapper == "torch.save":
        torch.load(io.BytesIO(payload(proof)), weights_only=False)
    else:
        pickle.loads(payload(proof))  # noqa: S301 - the attack, on a file of our own
    assert proof.exists()

    marker = tmp_path / "pwned"
    inputs["out"].with_name("s.duckdb.checkpoint").write_bytes(payload(marker))
    err = refused(inputs, capsys)
    assert "s.duckdb.checkpoint: not a whole featureatlas checkpoint" in err and "remove it" in err
    assert not marker.exists()


@pytest.mark.model
def test_a_checkpoint_is_one_safetensors_file_that_resumes(inputs, monkeypatch, capsys) -> None:
    checkpoint = interrupted_run(inputs, monkeypatch)
    header_length = struct.unpack("<Q", checkpoint.read_bytes()[:8])[0]
    header = json.loads(checkpoint.read_bytes()[8:8 + header_length])
    assert header["__metadata__"]["format"] == FORMAT
    state = json.loads(header["__metadata__"]["state"])
    assert set(state["inputs"]) == {"corpus", "model", "dictionaries"}
    assert str(inputs["corpus"] / "a.txt") in state["inputs"]["corpus"]
    assert "model.safetensors" in state["inputs"]["model"]
    assert str(inputs["sae"] / "sae_weights.safetensors") in state["inputs"]["dictionaries"]
    assert sorted(p.name for p in checkpoint.parent.iterdir() if p.name.startswith(".")) == []  # no temp left
    assert main(argv(inputs, "--resume")) == 0
    assert inputs["out"].is_file() and not checkpoint.exists()


@pytest.mark.model
def test_a_truncated_or_garbled_checkpoint_gets_one_line(inputs, monkeypatch, capsys) -> None:
    checkpoint = interrupted_run(inputs, monkeypatch)
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[:len(whole) // 2])
    assert "not a whole featureatlas checkpoint" in refused(inputs, capsys)

    save_file({"x": torch.zeros(2)}, str(checkpoint), metadata={"format": FORMAT, "state": "{not json"})
    assert "its state is not a JSON object; the file is damaged" in refused(inputs, capsys)

    header_length = struct.unpack("<Q", whole[:8])[0]
    header = json.loads(whole[8:8 + header_length])
    state = json.loads(header["__metadata__"]["state"])
    state["n_tokens"] = -5
    tensors = load_file(_write(checkpoint, whole))
    save_file(tensors, str(checkpoint), metadata={"format": FORMAT, "state": json.dumps(state)})
    assert "field n_tokens is -5; the file is damaged" in refused(inputs, capsys)

    key = next(k for k in tensors if k.endswith("top.values"))
    tensors[key] = torch.zeros(3, 3)
    state["n_tokens"] = 10
    save_file(tensors, str(checkpoint), metadata={"format": FORMAT, "state": json.dumps(state)})
    assert f"{key} is torch.float32 of shape (3, 3), this run's" in refused(inputs, capsys)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.model
def test_resume_refuses_a_changed_corpus_naming_the_file(inputs, monkeypatch, capsys) -> None:
    checkpoint = interrupted_run(inputs, monkeypatch)
    corpus_file = inputs["corpus"] / "d.txt"
    saved = corpus_file.read_bytes(), corpus_file.stat().st_mtime_ns

    corpus_file.write_bytes(saved[0] + b"more")
    err = refused(inputs, capsys)
    assert f"{checkpoint}: the corpus changed since it was written ({corpus_file} was {len(saved[0])} bytes, " \
           f"is {len(saved[0]) + 4}); resume only with the same corpus, model and dictionaries" in err

    corpus_file.write_bytes(saved[0].replace(b"fox", b"cat"))  # same size, other content
    os.utime(corpus_file, ns=(saved[1], saved[1]))
    assert f"({corpus_file} has other content)" in refused(inputs, capsys)

    corpus_file.write_bytes(saved[0])  # same content, touched
    assert f"({corpus_file} was modified (mtime))" in refused(inputs, capsys)

    os.utime(corpus_file, ns=(saved[1], saved[1]))
    (inputs["corpus"] / "e.txt").write_text("a new document")
    assert f"({inputs['corpus'] / 'e.txt'} is new)" in refused(inputs, capsys)
    (inputs["corpus"] / "e.txt").unlink()
    assert main(argv(inputs, "--resume")) == 0  # everything as it was: the resume goes ahead


@pytest.mark.model
def test_resume_refuses_changed_model_or_dictionary_weights(inputs, monkeypatch, capsys) -> None:
    interrupted_run(inputs, monkeypatch)
    sae_weights = inputs["sae"] / "sae_weights.safetensors"
    original, mtime = sae_weights.read_bytes(), sae_weights.stat().st_mtime_ns
    tensors = load_file(sae_weights)
    tensors["b_enc"] = tensors["b_enc"] + 1
    save_file(tensors, str(sae_weights))
    err = refused(inputs, capsys)
    assert f"the dictionaries changed since it was written ({sae_weights} has other content)" in err

    sae_weights.write_bytes(original)
    os.utime(sae_weights, ns=(mtime, mtime))
    model_weights = inputs["model"] / "model.safetensors"
    tensors = load_file(model_weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(model_weights), metadata={"format": "pt"})
    err = refused(inputs, capsys)
    assert "the model changed since it was written (model.safetensors" in err


class _Part:
    STATE = ("weights", "count", "label")

    def __init__(self, fill: float = 0.0) -> None:
        self.weights = torch.full((2, 3), fill, dtype=torch.bfloat16)
        self.count = 0
        self.label: object = "x"


class _Acc:
    def __init__(self, fill: float = 0.0) -> None:
        self.part = _Part(fill)

    def parts(self) -> dict[str, _Part]:
        return {"top": self.part}


def _config() -> object:
    """The options of a run, as shaping_options reads them (a dataclass)."""
    return make_dataclass("Config", [("top_k", int)])(3)


def test_a_save_that_fails_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "s.duckdb"
    saver = Checkpointer(out, 10)
    acc = _Acc(1.5)
    acc.part.count = 7
    saver.save(_config(), [acc], 4, 10, 1.0, datetime(2024, 1, 2, 3, 4, 5))
    before = saver.path.read_bytes()
    acc.part.label = object()  # not JSON: the save fails before anything replaces the file
    with pytest.raises(TypeError, match="STATE attribute 0.top.label is a object"):
        saver.save(_config(), [acc], 8, 20, 2.0, datetime(2024, 1, 2, 3, 4, 5))
    assert saver.path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [saver.path.name]

    fresh = _Acc()
    state = Checkpointer(out, 10).load(_config(), [fresh])
    assert state["n_tokens"] == 10 and state["started_at"] == datetime(2024, 1, 2, 3, 4, 5)
    assert fresh.part.count == 7 and fresh.part.label == "x"
    assert fresh.part.weights.dtype == torch.bfloat16 and torch.equal(fresh.part.weights, acc.part.weights)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=300), st.builds(lambda n, rest: struct.pack("<Q", n) + rest,
                                                          st.integers(0, 2**64 - 1), st.binary(max_size=200))))
def test_any_bytes_as_a_checkpoint_get_one_line(tmp_path: Path, data: bytes) -> None:
    out = tmp_path / "fuzz.duckdb"
    Path(str(out) + ".checkpoint").write_bytes(data)
    with pytest.raises(UsageError) as caught:
        Checkpointer(out, None).load(_config(), [_Acc()])
    assert "\n" not in str(caught.value) and str(caught.value).startswith(f"{out}.checkpoint: ")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=st.fixed_dictionaries({}, optional={
    "version": st.sampled_from([VERSION, 1, "2"]), "options": st.just({"top_k": 3}) | json_values,
    "inputs": st.just({}) | json_values, "values": st.just({"0.top.count": 1, "0.top.label": "y"}) | json_values,
    "sources": st.just(1) | json_values, "n_contexts": json_values, "n_tokens": json_values,
    "elapsed": json_values, "started_at": st.just("2024-01-01T00:00:00") | json_values}))
def test_any_checkpoint_state_loads_or_gets_one_line(tmp_path: Path, state: dict) -> None:
    out = tmp_path / "fuzz.duckdb"
    save_file({"0.top.weights": torch.zeros(2, 3, dtype=torch.bfloat16)}, str(out) + ".checkpoint",
              metadata={"format": FORMAT, "state": json.dumps(state)})
    try:
        Checkpointer(out, None).load(_config(), [_Acc()])
    except UsageError as err:
        assert "\n" not in str(err) and str(err).startswith(f"{out}.checkpoint: ")
