"""Write-then-rename, shared by the store, the site and checkpoints: outputs appear whole or not at all, and a
power cut never leaves less than the previous copy.

Work in progress lives beside its target as `.NAME.PID.partial` (same filesystem, so the final rename is
atomic). What is renamed into place is fsynced first and the folder holding it after, so the new copy is on disk
before the old one goes. A process killed outright (SIGKILL, power loss) cannot clean up after itself; the next
run does: a dead process's `.partial` is deleted, and its `.old` (the previous folder, moved aside by
`replace_folder` just before the crash) is put back when the target is missing, deleted when it is there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from featureatlas.errors import SiteError


def temp_path_beside(target: Path, kind: str = "partial") -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{kind}")


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (an fd opened read-only may be fsynced on POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path: Path) -> None:
    """Make renames and creations inside a folder durable; a no-op where folders cannot be opened (Windows)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Make every file and folder under folder durable: one sync of every filesystem where there is one (a site
    holds thousands of files: one fsync each costs far more), else fsync each, deepest first, links not followed."""
    if hasattr(os, "sync"):
        os.sync()
        return
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(root, name)
            if stat.S_ISREG(path.lstat().st_mode):  # not a link, FIFO or socket (opening a FIFO would block)
                fsync_file(path)
        for name in dirs:
            path = Path(root, name)
            if not path.is_symlink():
                fsync_folder(path)
    fsync_folder(folder)


def durable_replace(temp: Path, target: Path) -> None:
    """Rename a finished file into place so that after a crash either the old or the new one is there, whole."""
    fsync_file(temp)
    os.replace(temp, target)
    fsync_folder(target.parent)


@contextlib.contextmanager
def written_whole(target: Path) -> Iterator[Path]:
    """A path to write target's new content to, inside a staging folder of this process beside target (so a
    writer with temporary files of its own, as safetensors has, leaves them there too); moved into place with
    durable_replace when the block ends without an error; the folder is removed either way, and one a kill
    left behind by remove_stale_temps."""
    staging = temp_path_beside(target)
    staging.mkdir(exist_ok=True)
    try:
        yield staging / target.name
        durable_replace(staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(staging: Path, target: Path) -> None:
    """Move a finished folder into place, replacing an earlier one; if the move fails the earlier one stays.

    Between the two renames the earlier folder is `.NAME.PID.old`; a crash there is undone by the next run
    (`remove_stale_temps`, also called here), which moves it back."""
    remove_stale_temps(target)
    fsync_tree(staging)
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
    fsync_folder(target.parent)  # the new folder is durably in place before the old one goes
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temps(target: Path) -> None:
    """Clean up beside target after processes that are gone (POSIX only): their `.NAME.PID.partial` files and
    folders are deleted; their `.NAME.PID.old` (the previous copy, moved aside just before they died) becomes
    target again when target is missing (the newest, if several), and is deleted otherwise."""
    if os.name != "posix" or not target.parent.is_dir():  # os.kill(pid, 0) only probes on POSIX
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.(partial|old)(\.wal)?")
    stale: list[tuple[Path, str]] = []
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _alive(int(match.group(1))) and not entry.is_symlink():
            stale.append((entry, match.group(2) + (match.group(3) or "")))
    olds = sorted((entry for entry, kind in stale if kind == "old"), key=lambda p: p.stat().st_mtime_ns)
    if olds and not target.exists() and not target.is_symlink():
        os.replace(olds.pop(), target)  # the crash came between the two renames: the previous copy is the one
        fsync_folder(target.parent)
    for entry, kind in stale:
        if kind != "old" or entry in olds:
            _delete(entry)


def _delete(entry: Path) -> None:
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


def staging_dir(out_dir: Path) -> Path:
    """Create the temporary folder a site or export is written in (hidden, beside out_dir, same filesystem)."""
    remove_stale_temps(out_dir)
    staging = temp_path_beside(out_dir)
    if staging.exists():
        shutil.rmtree(staging)
    try:
        staging.mkdir()
    except OSError as err:
        raise SiteError(f"{out_dir}: cannot write in {out_dir.parent} ({err.strerror}); "
                        "choose another output folder") from None
    return staging
