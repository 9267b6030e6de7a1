"""The errors a user can act on: the CLI prints their one-line message and exits non-zero, without a traceback."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad option value."""


def user_errors() -> tuple[type[Exception], ...]:
    from featureatlas.build.site import SiteError
    from featureatlas.harvest.architectures import UnsupportedModelError
    from featureatlas.harvest.corpus import CorpusError
    from featureatlas.harvest.dictionaries import DictionaryError
    from featureatlas.harvest.models import ModelLoadError
    from featureatlas.store.annotate import AnnotationError
    from featureatlas.store.schema import StoreError
    return (UsageError, UnsupportedModelError, CorpusError, DictionaryError, ModelLoadError, StoreError, SiteError,
            AnnotationError)
