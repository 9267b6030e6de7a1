"""Settings as dataclass fields that carry their own help text: each default is stated once, where the library
reads it, and the command line turns the fields into options (featureatlas/commands/options.py).

A field's option is `--name-with-dashes` unless `flag` says otherwise; `metavar`, `choices`, `nargs` and `const`
go to argparse as they are, `parse` turns the text into the value (its ValueError becomes argparse's one line),
and `shown` is the default as the help text words it where the value alone says little (None: "all layers").
The settings several commands share (model, device, dtype, dictionaries) are made here once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

DEFAULT_TEXT_FIELD = "text"  # the corpus field or column read as text, as Hugging Face datasets name it
DEFAULT_SPLIT = "train"      # of a hub dataset or a folder saved from a DatasetDict, when no split is named
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_HELP = "model folder, .gguf file, hub id (online only), or smollm2-135m (embedded default)"
DTYPE_HELP = "auto: bfloat16 on CUDA and on CPUs with AVX-512 BF16, else float32"


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            **option: Any) -> Any:
    """A dataclass field with its help text; `option` holds what argparse needs beyond the type (metavar,
    choices, flag, ...). Pass `factory` instead of `default` for a mutable default."""
    metadata = {"help": help, **option}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def model_setting(help: str = MODEL_HELP, default: Any = dataclasses.MISSING) -> Any:
    """The model to load: a folder, a .gguf file, a hub id or the embedded model's name."""
    return setting(default, help)


def device_setting(help: str = "") -> Any:
    """auto, cpu or cuda (auto: CUDA when this machine has it)."""
    return setting("auto", help, choices=DEVICES)


def dtype_setting(help: str = DTYPE_HELP) -> Any:
    """The dtype the model runs in; auto picks what the hardware runs fast."""
    return setting("auto", help, choices=DTYPES)


def dictionaries_setting(help: str) -> Any:
    """Dictionaries, each [NAME=]PATH (the source becomes sae:NAME or transcoder:NAME); PATH@HOOK names the hook of a
    folder that does not say it (Gemma Scope's), and PATH may be a SAELens RELEASE/ID (docs/dictionaries.md)."""
    return setting(help=help, factory=list, flag="--sae", metavar="[NAME=]PATH[@HOOK]")
