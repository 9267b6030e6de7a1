"""Write-then-rename, shared by the store and the site: outputs appear whole or not at all.

Work in progress lives beside its target as `.NAME.PID.partial` (same filesystem, so the final rename is
atomic). A process killed outright (SIGKILL, power loss) cannot clean up after itself; the next run removes
what dead processes left behind.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def temp_path_beside(target: Path, kind: str = "partial") -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{kind}")


def replace_folder(staging: Path, target: Path) -> None:
    """Move a finished folder into place, replacing an earlier one; if the move fails the earlier one stays."""
    old = None
    if target.exists():
        old = temp_path_beside(target, "old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        if old is not None:
            os.replace(old, target)  # put the previous folder back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(target: Path) -> None:
    """Delete `.NAME.PID.*` files and folders beside target whose process is gone (POSIX only)."""
    if os.name != "posix" or not target.parent.is_dir():  # os.kill(pid, 0) only probes on POSIX
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.(partial|old)(\.wal)?")
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if not match or _alive(int(match.group(1))) or entry.is_symlink():
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
