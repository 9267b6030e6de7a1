"""Where a site is written: a temporary folder beside the target, renamed into place only when complete."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from featureatlas.atomic import remove_stale_temps, replace_folder
from featureatlas.errors import SiteError

MARKER = ".featureatlas-site"



def is_site(path: Path) -> bool:
    """True for a folder a previous build wrote (it holds our marker file)."""
    return (path / MARKER).is_file()


def check_target(out_dir: Path) -> None:
    """Refuse, before any work, an output folder we must not replace or cannot write."""
    remove_stale_temps(out_dir)  # first: an earlier run's crash may have left the previous folder aside
    if out_dir.is_symlink():
        raise SiteError(f"{out_dir}: is a symbolic link; give the real folder or choose another output folder")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise SiteError(f"{out_dir}: exists and is not a folder; remove it or choose another output folder")
        if any(out_dir.iterdir()) and not is_site(out_dir):
            raise SiteError(f"{out_dir}: folder is not empty and is not a featureatlas site; "
                            "choose another output folder or empty it first")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SiteError(f"{out_dir}: cannot create folder {parent} ({err.strerror}); "
                        "choose another output folder") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SiteError(f"{out_dir}: folder {parent} is not writable; choose another output folder")


def write_marker(site_dir: Path, store_path: Path) -> None:
    info = {"generator": "featureatlas", "store": str(store_path),
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (site_dir / MARKER).write_text(json.dumps(info) + "\n")


def publish(staging: Path, out_dir: Path) -> None:
    """Move the finished site into place, replacing an earlier site (or an empty folder) at out_dir."""
    check_target(out_dir)  # it may have changed during the build
    replace_folder(staging, out_dir)
