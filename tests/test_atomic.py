"""Folder replaces lose no copy: a process killed between the two renames of `replace_folder` (the previous
folder moved aside, the new one not yet in place) is undone by the next run, which puts the previous folder
back; leftovers of dead processes go only once the target is whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from featureatlas.atomic import durable_replace, remove_stale_temps, replace_folder, temp_path_beside


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The id of a process that has exited (what a kill -9 leaves behind)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def folder(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "index.html").write_text(content)
    (path / "sub").mkdir()
    (path / "sub" / "shard.json").write_text(content)
    return path


def crashed_between_renames(tmp_path: Path, pid: int) -> Path:
    """The disk as a replace killed between its renames leaves it: target gone, old copy aside, new staged."""
    folder(tmp_path / f".site.{pid}.old", "previous")
    folder(tmp_path / f".site.{pid}.partial", "new")
    return tmp_path / "site"


def test_the_next_run_puts_the_previous_folder_back(tmp_path: Path, dead_pid: int) -> None:
    target = crashed_between_renames(tmp_path, dead_pid)
    remove_stale_temps(target)
    assert (target / "index.html").read_text() == "previous" and (target / "sub" / "shard.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_the_next_replace_recovers_then_replaces(tmp_path: Path, dead_pid: int) -> None:
    target = crashed_between_renames(tmp_path, dead_pid)
    staging = folder(temp_path_beside(target), "newer")
    replace_folder(staging, target)
    assert (target / "index.html").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_a_stale_old_copy_beside_a_whole_target_is_deleted(tmp_path: Path, dead_pid: int) -> None:
    target = folder(tmp_path / "site", "current")
    folder(tmp_path / f".site.{dead_pid}.old", "previous")
    (tmp_path / f".site.{dead_pid}.partial").write_text("half")
    remove_stale_temps(target)
    assert (target / "index.html").read_text() == "current"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_a_live_process_old_copy_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "site"
    mine = folder(temp_path_beside(target, "old"), "previous")  # this process is alive: mid-replace, perhaps
    remove_stale_temps(target)
    assert not target.exists() and (mine / "index.html").read_text() == "previous"


def test_replace_folder_and_durable_replace_put_the_new_copy_in_place(tmp_path: Path) -> None:
    target = folder(tmp_path / "site", "v1")
    replace_folder(folder(temp_path_beside(target), "v2"), target)
    assert (target / "sub" / "shard.json").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]

    file = tmp_path / "data.bin"
    file.write_bytes(b"old")
    temp = temp_path_beside(file)
    temp.write_bytes(b"new")
    durable_replace(temp, file)
    assert file.read_bytes() == b"new" and not temp.exists()
