"""The errors a user can act on: the CLI prints their one-line message and exits non-zero, without a traceback.

Each names the file or setting and what to do. Library code raises them in terms of settings (`context_length`);
the command line names its flags (`--context-length`) where it maps them.
"""

from __future__ import annotations


class FeatureAtlasError(Exception):
    """Any error whose message alone tells the user what to do."""


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
