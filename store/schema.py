"""The store's schema: one DuckDB file, tables behind documented views (schema.sql is the reference)."""

from __future__ import annotations

from pathlib import Path

import duckdb

# 3: per-token activations stored as 16-bit codes (store/encoding.py) behind the unchanged `examples` view.
SCHEMA_VERSION = 3
SCHEMA_SQL = (Path(__file__).parent / "schema.sql").read_text()
# The explanations table and view, a marked part of schema.sql: added to version 2 in place (see there); every
# version-3 store has them from the start, so for those ensure_explanations changes nothing.
EXPLANATIONS_SQL = SCHEMA_SQL[SCHEMA_SQL.index("-- Explanations:"):SCHEMA_SQL.index("-- End of explanations.")]


class StoreError(Exception):
    """A store that cannot be used; the message says which file and what to do."""


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA_SQL)
    con.execute("INSERT INTO t_meta VALUES ('schema_version', ?), ('format', 'featureatlas')", [str(SCHEMA_VERSION)])


def open_store(path: str | Path) -> duckdb.DuckDBPyConnection:
    """Open a finished store read-only, refusing files that are not featureatlas stores of this version."""
    return _open_checked(Path(path), read_only=True)


def open_store_for_update(path: str | Path) -> duckdb.DuckDBPyConnection:
    """Open a finished store read-write, for commands that add to it (annotate), with open_store's refusals."""
    return _open_checked(Path(path), read_only=False)


def ensure_explanations(con: duckdb.DuckDBPyConnection) -> None:
    """Give a version-2 store written before explanations existed their (empty) table and view."""
    con.execute(EXPLANATIONS_SQL)


def _open_checked(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    if not path.is_file():
        raise StoreError(f"{path}: no such store; create one with `featureatlas harvest --out {path}`")
    con = None
    try:
        con = duckdb.connect(str(path), read_only=read_only)
        rows = dict(con.execute("SELECT key, value FROM t_meta").fetchall())
    except (duckdb.Error, OSError) as err:
        if con is not None:
            con.close()  # a read-write connection would hold the file's lock
        first = str(err).splitlines()[0]
        if "lock" in first.lower():
            raise StoreError(f"{path}: in use by another process ({first}); let it finish, then retry") from None
        raise StoreError(f"{path}: not a featureatlas store ({first}); "
                         "pass a .duckdb file written by `featureatlas harvest`") from None
    version = rows.get("schema_version")
    if rows.get("format") != "featureatlas" or version != str(SCHEMA_VERSION):
        con.close()
        raise StoreError(f"{path}: store schema version {version}, this featureatlas reads version "
                         f"{SCHEMA_VERSION}; harvest it again with this version")
    return con
