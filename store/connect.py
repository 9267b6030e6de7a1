"""DuckDB connections that nothing inside a store can use to reach outside it.

A store is untrusted input (shared by colleagues, released with papers): a view or macro could call
`read_text('~/.ssh/id_rsa')`, `read_csv('/proc/self/environ')` or load httpfs and send what it read away. Every
connection featureatlas opens on a store therefore has external access off (no file, URL or extension reads;
only the stores `merge` attaches are readable), extensions neither installed nor loaded automatically, and its
configuration locked; external access cannot be turned back on while the database runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import duckdb

_NO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}


def safe_connect(path: str | Path, read_only: bool = False, threads: int | None = None,
                 readable: Iterable[str | Path] = ()) -> duckdb.DuckDBPyConnection:
    """Open `path` with external access off and configuration locked; `readable`: other database files this
    connection may ATTACH (their WAL files too); `threads`: DuckDB's threads, fixed for the connection's life."""
    readable = [str(Path(p).resolve()) for p in readable]
    config: dict[str, object] = dict(_NO_EXTENSIONS)
    if threads is not None:
        config["threads"] = int(threads)
    if not readable:  # allowed_paths can only be set once the database runs, so then external access goes after
        config["enable_external_access"] = False
    con = duckdb.connect(str(path), read_only=read_only, config=config)
    try:
        if readable:
            paths = ", ".join(_literal(p) for name in readable for p in (name, name + ".wal"))
            con.execute(f"SET allowed_paths = [{paths}]")
            con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
