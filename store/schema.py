"""The store's schema: one DuckDB file, tables behind documented views (schema.sql is the reference)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import duckdb

from featureatlas.errors import StoreError, setting_name
from featureatlas.store.connect import safe_connect

# 3: per-token activations stored as 16-bit codes (store/encoding.py) behind the unchanged `examples` view.
SCHEMA_VERSION = 3
SCHEMA_SQL = (Path(__file__).parent / "schema.sql").read_text()
HISTOGRAM_HALF = 130  # histogram bins each side of zero: a stored bin outside -130..130 is not a store's
# The explanations table and view, a marked part of schema.sql: added to version 2 in place (see there); every
# version-3 store has them from the start, so for those ensure_explanations changes nothing.
EXPLANATIONS_SQL = SCHEMA_SQL[SCHEMA_SQL.index("-- Explanations:"):SCHEMA_SQL.index("-- End of explanations.")]



def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA_SQL)
    con.execute("INSERT INTO t_meta VALUES ('schema_version', ?), ('format', 'featureatlas')", [str(SCHEMA_VERSION)])


def open_store(path: str | Path, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """Open a finished store read-only (see store/connect.py), refusing files that are not featureatlas stores of
    this version and stores whose tables, views or macros differ from what this version defines."""
    return _open_checked(Path(path), read_only=True, threads=threads)


def open_store_for_update(path: str | Path) -> duckdb.DuckDBPyConnection:
    """Open a finished store read-write, for commands that add to it (annotate), with open_store's refusals."""
    return _open_checked(Path(path), read_only=False)


def ensure_explanations(con: duckdb.DuckDBPyConnection) -> None:
    """Give a version-2 store written before explanations existed their (empty) table and view."""
    con.execute(EXPLANATIONS_SQL)


# Stores written before explanations, neighbours, layouts, ablations or attributions existed lack their tables and
# views (annotate adds the explanations': ensure_explanations).
_OPTIONAL = {("table", "main.t_explanations"), ("view", "main.explanations"), ("table", "main.t_neighbours"),
             ("view", "main.neighbours"), ("table", "main.t_layout"), ("view", "main.map"),
             ("table", "main.t_ablations"), ("view", "main.ablations"),
             ("table", "main.t_attributions"), ("view", "main.attributions")}


def check_catalog(con: duckdb.DuckDBPyConnection, path: Path, database: str | None = None) -> None:
    """Refuse a store whose tables or views are not exactly this version's, or that defines macros: the views
    are the public interface every command reads, so a store redefining one could make them read anything."""
    found = _catalog(con, database)
    expected = _expected_catalog()
    for (kind, name), sql in sorted(found.items()):
        if expected.get((kind, name)) != sql:
            what = "defines a macro" if kind == "macro" else (
                f"has a {kind} this version does not define" if (kind, name) not in expected
                else f"redefines the {kind}")
            raise StoreError(f"{path}: {what} {_printable(name)!s}; a featureatlas store holds only the tables and "
                             "views of schema.sql: harvest it again, or open it with plain duckdb to inspect it")
    missing = sorted(set(expected) - set(found) - _OPTIONAL)
    if missing:
        kind, name = missing[0]
        raise StoreError(f"{path}: has no {kind} {name}; harvest it again with this version")


def _catalog(con: duckdb.DuckDBPyConnection, database: str | None = None) -> dict[tuple[str, str], str]:
    """Every table, view and macro of a database (default: the connection's own), by kind and name, with its SQL."""
    where = "database_name = coalesce(?, current_database()) AND NOT internal"
    rows = con.execute(f"""
        SELECT 'table', schema_name || '.' || table_name, sql FROM duckdb_tables() WHERE {where}
        UNION ALL SELECT 'view', schema_name || '.' || view_name, sql FROM duckdb_views() WHERE {where}
        UNION ALL SELECT 'macro', schema_name || '.' || function_name, coalesce(macro_definition, '')
            FROM duckdb_functions() WHERE {where} AND function_type IN ('macro', 'table_macro')
        """, [database, database, database]).fetchall()
    return {(kind, name): sql for kind, name, sql in rows}


@cache
def _expected_catalog() -> dict[tuple[str, str], str]:
    con = safe_connect(":memory:")
    try:
        con.execute(SCHEMA_SQL)
        return _catalog(con)
    finally:
        con.close()


def _printable(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")[:100]


# Stores whose catalog this process has checked, by _identity: a build or a server opens one store many times, and
# each check lists DuckDB's thousands of functions (about 20 ms); any write to the file or its WAL checks it again.
_CHECKED: set[tuple] = set()


def _identity(path: Path) -> tuple:
    """What changes whenever the store's file or its WAL is written or replaced."""
    found = []
    for file in (path, path.with_name(path.name + ".wal")):
        try:
            st = file.stat()
        except OSError:
            found.append(None)
            continue
        found.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(found)


def _open_checked(path: Path, read_only: bool, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    if not path.is_file():
        raise StoreError(f"{path}: no such store; create one with `featureatlas harvest {setting_name('out')} {path}`")
    con, before = None, _identity(path)
    try:
        con = safe_connect(path, read_only=read_only, threads=threads)
        rows = dict(con.execute("SELECT key, value FROM t_meta").fetchall())
    except (duckdb.Error, OSError, ValueError, TypeError) as err:
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
        raise StoreError(f"{path}: store schema version {_printable(str(version))}, this featureatlas reads version "
                         f"{SCHEMA_VERSION}; harvest it again with this version")
    unchanged = _identity(path) == before  # nothing wrote the files while the connection read its catalog
    if unchanged and before in _CHECKED:
        return con
    try:
        check_catalog(con, path)
    except BaseException:
        con.close()
        raise
    if unchanged:
        _CHECKED.add(before)
    return con
