"""The store's schema: one DuckDB file, tables behind documented views (schema.sql is the reference)."""

from __future__ import annotations

from pathlib import Path

import duckdb

SCHEMA_VERSION = 2
SCHEMA_SQL = (Path(__file__).parent / "schema.sql").read_text()


class StoreError(Exception):
    """A store that cannot be used; the message says which file and what to do."""


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA_SQL)
    con.execute("INSERT INTO t_meta VALUES ('schema_version', ?), ('format', 'featureatlas')", [str(SCHEMA_VERSION)])


def open_store(path: str | Path) -> duckdb.DuckDBPyConnection:
    """Open a finished store read-only, refusing files that are not featureatlas stores of this version."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such store; create one with `featureatlas harvest --out {path}`")
    try:
        con = duckdb.connect(str(path), read_only=True)
        rows = dict(con.execute("SELECT key, value FROM t_meta").fetchall())
    except (duckdb.Error, OSError) as err:
        raise StoreError(f"{path}: not a featureatlas store ({str(err).splitlines()[0]}); "
                         "pass a .duckdb file written by `featureatlas harvest`") from None
    version = rows.get("schema_version")
    if rows.get("format") != "featureatlas" or version != str(SCHEMA_VERSION):
        con.close()
        raise StoreError(f"{path}: store schema version {version}, this featureatlas reads version "
                         f"{SCHEMA_VERSION}; harvest it again with this version")
    return con
