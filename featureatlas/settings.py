"""Settings as dataclass fields that carry their own help text: each default is stated once, where the library
reads it, and the command line turns the fields into options (featureatlas/commands/options.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            **option: Any) -> Any:
    """A dataclass field with its help text; `option` holds what argparse needs beyond the type (metavar,
    choices, flag, ...). Pass `factory` instead of `default` for a mutable default."""
    metadata = {"help": help, **option}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def help_of(cls: type, name: str) -> str:
    """The help text of one setting of a settings dataclass."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)
