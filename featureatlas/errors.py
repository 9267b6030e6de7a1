"""The errors a user can act on: the CLI prints their one-line message and exits non-zero, without a traceback.

Each names the file or setting and what to do. Library code names a setting with `setting_name("context_length")`:
the message reads `context_length`, and the command line, which knows its flags, prints `--context-length` there.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_MARK = "\x1f"  # around a setting's name in a message; no path or command-line argument holds it in practice
_MARKED = re.compile(f"{_MARK}(\\w+){_MARK}")


def setting_name(name: str) -> str:
    """`name` (a settings field, e.g. context_length) marked in an error message, for the CLI to name its flag."""
    return f"{_MARK}{name}{_MARK}"


class FeatureAtlasError(Exception):
    """Any error whose message alone tells the user what to do."""

    def __init__(self, message: object = "", *args: object) -> None:
        marked = str(message)
        super().__init__(marked.replace(_MARK, ""), *args)
        self.marked = marked

    def naming(self, flag: Callable[[str], str | None]) -> str:
        """The message with each setting it names as `flag(name)` says (kept as the name where that is None)."""
        return _MARKED.sub(lambda m: flag(m[1]) or m[1], getattr(self, "marked", str(self)))


class UsageError(FeatureAtlasError, ValueError):
    """A bad option value."""


class ModelLoadError(FeatureAtlasError):
    """A model that cannot be loaded or cannot read the input asked of it."""


class UnsupportedModelError(FeatureAtlasError):
    """A model architecture whose MLPs and blocks featureatlas does not know."""


class CorpusError(FeatureAtlasError):
    """A corpus that cannot be read: the file, the line and the fix."""


class DictionaryError(FeatureAtlasError):
    """A dictionary folder we cannot reproduce exactly: the file, the field, and what to do."""


class StoreError(FeatureAtlasError):
    """A store that cannot be used: which file and what to do."""


class SiteError(FeatureAtlasError):
    """A site that cannot be written or served: the path and what to do."""


class AnnotationError(FeatureAtlasError, ValueError):
    """Explanations that cannot be loaded: the file, the line and what to do."""
