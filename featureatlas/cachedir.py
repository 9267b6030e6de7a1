"""Where featureatlas keeps what it can rebuild: converted models, built native code."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$FEATUREATLAS_CACHE, else $XDG_CACHE_HOME/featureatlas, else ~/.cache/featureatlas."""
    if os.environ.get("FEATUREATLAS_CACHE"):
        return Path(os.environ["FEATUREATLAS_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME") and Path(os.environ["XDG_CACHE_HOME"]).is_absolute():
        return Path(os.environ["XDG_CACHE_HOME"]) / "featureatlas"
    return Path.home() / ".cache" / "featureatlas"
