"""Checkpoints: a harvest's whole state, saved durably every N tokens, so that `--resume` after a crash (even
`kill -9`, even mid-save, even a power cut) continues where the last checkpoint left off and writes the very
store an uninterrupted run would have written.

A checkpoint is one safetensors file: every accumulator's STATE tensors (TopK, Reservoir, Statistics list
theirs; CoOccurrence's pair lists are RESIZABLE, their length the data's) as tensors, and everything else as one
JSON string in the file's metadata: the options that shape the result, fingerprints of the run's inputs (corpus
files, model files, dictionary files), how many contexts were consumed, the elapsed time, and the STATE values
that are plain numbers. Nothing is pickled, so loading a file someone placed beside --out runs no code: at worst
it is refused with one line.

A resume is refused, naming the difference, when an option differs or an input changed: a file's size, mtime,
or a hash of its first and last MiB. Hub models are fingerprinted through their locally cached snapshot and
revision; a streamed hub dataset only by name (nothing of it is on disk to compare).

Contexts are not saved: a resume reads the corpus again up to where it stopped, keeping the contexts the
restored examples refer to, and runs no forward pass on them. Batches start at the same contexts as before, so
every later batch, and so every result, is the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from featureatlas.atomic import remove_stale_temps, written_whole
from featureatlas.errors import UsageError, setting_name

FORMAT = "featureatlas-checkpoint"
VERSION = 2
# Options that do not change what a harvest computes (the same results either way): a resume may differ in these.
_FREE = {"progress", "resume", "overwrite", "checkpoint_every", "out", "fixed_shapes", "cuda_graphs", "native"}
_MIB = 1 << 20
# Files of a model folder that decide what it computes and how text becomes tokens.
_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt", ".tiktoken")
_REMEDY = "resume only with the same corpus, model and dictionaries, or remove the checkpoint to start again"


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint")


def shaping_options(config: object) -> dict[str, Any]:
    """The harvest options that shape the result, as plain values (what a checkpoint and a run record)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items() if k not in _FREE}


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size, mtime and sha256 of the first and last MiB: cheap on a multi-GB file, and any edit that keeps the
    size almost always moves the mtime."""
    try:
        stat = path.stat()
        digest = hashlib.sha256()
        with path.open("rb") as f:
            digest.update(f.read(_MIB))
            if stat.st_size > _MIB:
                f.seek(max(_MIB, stat.st_size - _MIB))
                digest.update(f.read(_MIB))
    except OSError as err:
        raise UsageError(f"{path}: cannot read it to fingerprint the run's inputs ({err.strerror}); "
                         "make it readable") from None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def run_inputs(corpus: Path | str, split: str | None, model_location: str, gguf_file: str | None,
               revision: str | None, dictionary_folders: list[Path]) -> dict[str, dict[str, Any]]:
    """Fingerprints of everything a harvest reads besides its options, grouped as corpus, model and dictionaries;
    a resume compares them with the checkpoint's.

    model_location and gguf_file are a ModelRef's; revision is the hub commit the model was loaded at (None for
    local files)."""
    from featureatlas.load.corpus import corpus_files, hub_dataset

    hub = hub_dataset(corpus)
    corpus_part = ({"hub dataset": hub} if hub is not None
                   else {str(file): file_fingerprint(file) for file in corpus_files(Path(corpus), split)})
    model_part: dict[str, Any] = {} if revision is None else {"hub revision": revision}
    folder = Path(model_location)
    if gguf_file is not None:
        model_part[gguf_file] = file_fingerprint(folder / gguf_file)
    else:
        if not folder.is_dir():  # a hub id: its snapshot in the local cache, where the weights were loaded from
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(model_location, "config.json")
            folder = Path(cached).parent if isinstance(cached, str) else folder
        model_part.update({p.name: file_fingerprint(p) for p in _plain_files(folder)
                           if p.name.endswith(_MODEL_SUFFIXES)})
    dictionaries = {str(p): file_fingerprint(p) for folder in dictionary_folders
                    for p in [*_plain_files(folder), *(q for sub in _plain_folders(folder) for q in _plain_files(sub))]}
    return {"corpus": corpus_part, "model": model_part, "dictionaries": dictionaries}


def _plain_files(folder: Path) -> list[Path]:
    """The visible files directly in folder, sorted; none when it is no folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _plain_folders(folder: Path) -> list[Path]:
    """The visible folders directly in folder (not links), sorted: a Llama Scope release keeps its weights in
    checkpoints/."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))


class Checkpointer:
    """Saves every `every` tokens (None: never). A save is durable before it replaces the previous checkpoint, so
    a kill or power cut leaves one of them whole. inputs: `run_inputs` of this run ({} when not checkpointing)."""

    def __init__(self, out: Path, every: int | None, inputs: dict[str, dict[str, Any]] | None = None):
        self.path = checkpoint_path(Path(out))
        self.every = every
        self.inputs = inputs or {}
        self._next = every
        remove_stale_temps(self.path)  # a save that a kill -9 interrupted left its partial file behind

    def due(self, n_tokens: int) -> bool:
        return self._next is not None and n_tokens >= self._next

    def save(self, config: object, accumulators: list, n_contexts: int, n_tokens: int, elapsed: float,
             started_at: datetime) -> None:
        tensors: dict[str, torch.Tensor] = {}
        values: dict[str, Any] = {}
        for key, value in _state(accumulators):
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
            else:
                values[key] = _plain(key, value)
        header = {"version": VERSION, "options": shaping_options(config), "inputs": self.inputs,
                  "sources": len(accumulators), "n_contexts": n_contexts, "n_tokens": n_tokens,
                  "elapsed": float(elapsed), "started_at": started_at.isoformat(), "saved_at": time.time(),
                  "values": values}
        with written_whole(self.path) as temp:
            save_file(tensors, str(temp), metadata={"format": FORMAT, "state": json.dumps(header)})
        if self.every is not None:
            self._next = n_tokens + self.every

    def load(self, config: object, accumulators: list) -> dict[str, Any]:
        """Restore the accumulators from the checkpoint; returns its counters (n_contexts, n_tokens, elapsed,
        started_at). Refuses, in one line, a file that is not a whole checkpoint, and one of other options or
        inputs, naming the first difference."""
        if not self.path.is_file():
            raise UsageError(f"{self.path}: no checkpoint to resume from; run without {setting_name('resume')} "
                             f"(a checkpoint is "
                             f"written every {setting_name('checkpoint_every')} tokens)")
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                header = self._header(f.metadata() or {})
                self._check(config, header, len(accumulators))
                stored = set(f.keys())
                for key, current, part, attr in _targets(accumulators):
                    if key in stored:
                        _restore(part, attr, current, f.get_tensor(key), key)
                    elif key in header["values"] and not isinstance(current, torch.Tensor):
                        setattr(part, attr, _same_kind(key, current, header["values"][key]))
                    else:
                        raise UsageError(f"{self.path}: holds no {key}; resume with the same model and options")
                for acc in accumulators:  # what updates index by, the native loops through raw pointers, in range
                    getattr(acc, "check_state", lambda: None)()
        except UsageError as err:
            raise UsageError(str(err) if str(err).startswith(str(self.path)) else f"{self.path}: {err}") from None
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types; any damage gets the same advice
            first = (str(err).splitlines() or [type(err).__name__])[0]
            raise UsageError(f"{self.path}: not a whole featureatlas checkpoint ({first}); remove it and harvest "
                             "again") from None
        if self.every is not None:
            self._next = header["n_tokens"] + self.every
        return header

    def _header(self, metadata: dict[str, str]) -> dict[str, Any]:
        """The JSON part, checked field by field: the file may come from anywhere."""
        if metadata.get("format") != FORMAT:
            raise UsageError("not a featureatlas checkpoint (written by an older version, or another file); "
                             "remove it and harvest again")
        try:
            header = json.loads(metadata.get("state", ""))
        except ValueError:
            header = None
        if not isinstance(header, dict):
            raise UsageError("its state is not a JSON object; the file is damaged: remove it and harvest again")
        if header.get("version") != VERSION:
            raise UsageError("checkpoint of another featureatlas version; remove it and harvest again")
        for name, kinds in (("options", dict), ("inputs", dict), ("values", dict), ("sources", int),
                            ("n_contexts", int), ("n_tokens", int), ("elapsed", (int, float)), ("started_at", str)):
            value = header.get(name)
            if not isinstance(value, kinds) or isinstance(value, bool) or (
                    isinstance(value, (int, float)) and not (math.isfinite(value) and value >= 0)):
                raise UsageError(f"field {name} is {value!r}; the file is damaged: remove it and harvest again")
        try:
            header["started_at"] = datetime.fromisoformat(header["started_at"])
        except ValueError:
            raise UsageError(f"field started_at is {header['started_at']!r}, not a date; the file is damaged: "
                             "remove it and harvest again") from None
        return header

    def _check(self, config: object, header: dict[str, Any], n_sources: int) -> None:
        options = shaping_options(config)
        for name in sorted(set(options) | set(header["options"])):
            if options.get(name) != header["options"].get(name):
                raise UsageError(f"was written with --{name.replace('_', '-')} {header['options'].get(name)!r}, "
                                 f"not {options.get(name)!r}; resume with the same options, or remove the "
                                 "checkpoint to start again")
        for group in sorted(set(self.inputs) | set(header["inputs"])):
            change = _difference(header["inputs"].get(group) or {}, self.inputs.get(group) or {})
            if change:
                raise UsageError(f"the {group} changed since it was written ({change}); {_REMEDY}")
        if header["sources"] != n_sources:
            raise UsageError(f"holds {header['sources']} sources, this run has {n_sources}; resume with the same "
                             "model and options")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _state(accumulators: list) -> list[tuple[str, Any]]:
    return [(key, current) for key, current, _, _ in _targets(accumulators)]


def _targets(accumulators: list) -> list[tuple[str, Any, object, str]]:
    """(key, current value, part, attribute) of every STATE attribute; keys like '0.top.values'."""
    return [(f"{i}.{name}.{attr}", getattr(part, attr), part, attr)
            for i, acc in enumerate(accumulators) for name, part in acc.parts().items() for attr in part.STATE]


def _plain(key: str, value: Any) -> Any:
    """A STATE value that is not a tensor, as JSON holds it; anything else is a bug in the part declaring it."""
    if hasattr(value, "item") and not isinstance(value, (bool, int, float, str)):
        value = value.item()  # a numpy scalar
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint: STATE attribute {key} is a {type(value).__name__}; make it a tensor or a number")


def _same_kind(key: str, current: Any, value: Any) -> Any:
    """A saved plain value, if it is of the kind the attribute holds now (a float attribute takes an int)."""
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(current):
        raise UsageError(f"{key} is {value!r}, not a {type(current).__name__}; the file is damaged: remove it and "
                         "harvest again")
    return value


def _difference(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """The first of saved's entries that now differs, in words ('' when none), and how many more do."""
    changes = []
    for name in sorted(set(saved) | set(now)):
        was, is_ = saved.get(name), now.get(name)
        if was == is_:
            continue
        if was is None:
            changes.append(f"{name} is new")
        elif is_ is None:
            changes.append(f"{name} is gone")
        elif isinstance(was, dict) and isinstance(is_, dict):
            if was.get("size") != is_.get("size"):
                changes.append(f"{name} was {was.get('size')} bytes, is {is_.get('size')}")
            elif was.get("sha256") != is_.get("sha256"):
                changes.append(f"{name} has other content")
            else:
                changes.append(f"{name} was modified (mtime)")
        else:
            changes.append(f"{name} was {was!r}, is {is_!r}")
    if not changes:
        return ""
    return changes[0] + (f", and {len(changes) - 1} more" if len(changes) > 1 else "")


def _restore(part: object, attr: str, current: Any, value: torch.Tensor, key: str) -> None:
    if not isinstance(current, torch.Tensor):
        setattr(part, attr, value)
        return
    if attr in getattr(part, "RESIZABLE", ()):  # data-sized (co-occurrence pairs): the part's check_state vets it
        if current.dtype != value.dtype or current.dim() != value.dim():
            raise UsageError(f"{key} is {value.dtype} with {value.dim()} dimensions, this run's {current.dtype} "
                             f"with {current.dim()}; resume with the same model and options")
        setattr(part, attr, value.to(current.device))
        return
    if current.shape != value.shape or current.dtype != value.dtype:
        raise UsageError(f"{key} is {value.dtype} of shape {tuple(value.shape)}, this run's "
                         f"{current.dtype} of shape {tuple(current.shape)}; resume with the same model and options")
    current.copy_(value.to(current.device))
