"""Crafted stores and sites, as an attacker would share them: nothing in them reads a user's files, runs code or
sizes memory; each is refused with one line naming the store (or what it would have read stays out of reach)."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pytest

from featureatlas.cli import main
from featureatlas.store.connect import safe_connect
from featureatlas.store.schema import StoreError, open_store

from helpers.synthetic_store import make_store

SECRET = "featureatlas-test-secret-7f3a"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("template") / "store.duckdb", n_layers=1, n_units=8)


@pytest.fixture()
def store(template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(template, tmp_path / "store.duckdb"))


@pytest.fixture()
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "id_rsa"
    path.write_text(SECRET)
    return path


def craft(store: Path, *statements: str) -> None:
    """Edit a store with plain DuckDB, as an attacker would before sharing it."""
    con = duckdb.connect(str(store))
    for statement in statements:
        con.execute(statement)
    con.close()


def run(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_view_that_reads_a_local_file_is_refused_and_nothing_is_read(store: Path, secret: Path, capsys) -> None:
    craft(store, f"CREATE OR REPLACE VIEW runs AS SELECT * REPLACE ((SELECT content FROM read_text('{secret}')) "
                 "AS corpus) FROM t_runs")
    with duckdb.connect(str(store), read_only=True) as plain:  # the attack is real: plain DuckDB reads the file
        assert plain.execute("SELECT corpus FROM runs").fetchone()[0] == SECRET
    code, out, err = run(capsys, "info", store)
    assert code == 2 and SECRET not in out + err
    assert err.strip().count("\n") == 0 and "redefines the view main.runs" in err and str(store) in err
    for command in (["build", store, "--out", store.parent / "site"],
                    ["export", store, "--out", store.parent / "json"]):
        code, out, err = run(capsys, *command)
        assert code == 2 and "redefines the view main.runs" in err and SECRET not in out + err
    assert not (store.parent / "site").exists() and not (store.parent / "json").exists()


def test_even_an_unchecked_connection_cannot_reach_files_extensions_or_settings(store: Path, secret: Path) -> None:
    con = safe_connect(store, read_only=True)
    for statement in (f"SELECT * FROM read_text('{secret}')", f"SELECT * FROM read_csv('{secret}')",
                      f"ATTACH '{store.parent / 'other.duckdb'}' AS other", "INSTALL httpfs", "LOAD httpfs",
                      "SET enable_external_access = true", "SET lock_configuration = false",
                      f"COPY (SELECT 1) TO '{store.parent / 'out.csv'}'"):
        with pytest.raises(duckdb.Error):
            con.execute(statement)
    assert not (store.parent / "out.csv").exists()
    con.close()


@pytest.mark.parametrize("statements, expected", [
    (["CREATE MACRO leak(x) AS x + 1"], "defines a macro main.leak"),
    (["CREATE VIEW extra AS SELECT 1"], "has a view this version does not define main.extra"),
    (["CREATE TABLE t_extra (a INTEGER)"], "has a table this version does not define main.t_extra"),
    (["DROP VIEW units", "CREATE VIEW units AS SELECT * FROM t_units"], "redefines the view main.units"),
    (["DROP VIEW examples", "DROP VIEW units", "DROP VIEW statistics", "ALTER TABLE t_units ALTER unit TYPE VARCHAR",
      "UPDATE t_units SET unit = '<img src=x onerror=alert(1)>' WHERE unit = '1'"],
     "redefines the table main.t_units"),
    (["DROP VIEW logit_effects", "DROP VIEW sources", "CREATE VIEW sources AS SELECT * FROM t_sources"],
     "has no view main.logit_effects"),
    (["CREATE SCHEMA evil", "CREATE VIEW evil.runs AS SELECT 1"], "has a view this version does not define evil.runs"),
])
def test_anything_but_this_versions_schema_is_refused(store: Path, statements: list[str], expected: str) -> None:
    craft(store, *statements)
    with pytest.raises(StoreError) as err:
        open_store(store)
    assert expected in str(err.value) and str(store) in str(err.value) and "\n" not in str(err.value)


def test_a_store_changed_after_it_was_checked_is_checked_again(store: Path) -> None:
    """Each process checks a store once while its files stay as they were (schema._CHECKED); any write is seen."""
    for _ in range(2):
        open_store(store).close()
    craft(store, "CREATE MACRO leak(x) AS x + 1")
    with pytest.raises(StoreError, match="defines a macro main.leak"):
        open_store(store)


def test_a_table_of_other_types_is_refused_before_anything_renders_it(store: Path, capsys) -> None:
    craft(store, "DROP VIEW examples", "DROP VIEW statistics", "DROP VIEW units",
          "ALTER TABLE t_units ALTER unit TYPE VARCHAR",
          "CREATE VIEW units AS SELECT * FROM t_units")  # not this version's units view: the SQL differs
    code, out, err = run(capsys, "build", store, "--out", store.parent / "site")
    assert code == 2 and ("redefines the table main.t_units" in err or "redefines the view" in err)


def test_merge_refuses_a_crafted_input_and_writes_nothing(store: Path, template: Path, secret: Path, capsys) -> None:
    craft(store, f"CREATE OR REPLACE VIEW documents AS SELECT 0::BIGINT AS document_id, "
                 f"(SELECT content FROM read_text('{secret}')) AS name, 0::BIGINT AS n_tokens")
    out = store.parent / "merged.duckdb"
    code, _, err = run(capsys, "merge", template, store, "--out", out)
    assert code == 2 and "redefines the view main.documents" in err and not out.exists()


def test_info_escapes_control_characters(store: Path, capsys) -> None:
    craft(store, "UPDATE t_runs SET corpus = 'x' || chr(27) || ']0;pwned' || chr(7) || chr(27) || '[2J' "
                 "|| chr(8238) || 'txt.exe'")
    code, out, _ = run(capsys, "info", store)
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "x\\x1b]0;pwned\\x07\\x1b[2J\\u202etxt.exe" in out


def test_a_histogram_range_is_checked_before_it_sizes_anything(store: Path, capsys) -> None:
    craft(store, "UPDATE t_histograms SET bins = [-32768, 32767], counts = [1, 1] WHERE unit = 0")
    code, _, err = run(capsys, "build", store, "--out", store.parent / "site")
    assert code == 2 and "histogram bin" in err and "outside -130..130" in err


def test_unit_numbers_beyond_the_units_held_are_refused(store: Path, capsys) -> None:
    craft(store, "UPDATE t_units SET unit = 2000000000 WHERE unit = 7")
    code, _, err = run(capsys, "build", store, "--out", store.parent / "site")
    assert code == 2 and "numbers its 8 units up to 2,000,000,000" in err


def test_an_incremental_build_does_not_follow_links_out_of_the_site(store: Path, secret: Path, capsys) -> None:
    site = store.parent / "site"
    assert run(capsys, "build", store, "--out", site)[0] == 0
    layer = next(p for p in site.rglob("unit.html") if p.parent != site).parent
    shutil.rmtree(layer)
    stolen = store.parent / "home"
    stolen.mkdir()
    shutil.copy(secret, stolen / "unit.html")
    layer.symlink_to(stolen, target_is_directory=True)  # the layer folder now leads to the user's files
    craft(store, "UPDATE t_runs SET n_tokens = n_tokens")  # nothing changed: the layer would be reused
    code, _, err = run(capsys, "build", store, "--out", site, "--incremental")
    assert code == 2 and "leads out of the site" in err
    assert not any(SECRET in p.read_text(errors="replace") for p in site.rglob("*") if p.is_file()
                   and not p.is_symlink() and stolen not in p.resolve().parents)


def test_harvest_refuses_an_out_folder_where_no_file_can_be_made_before_loading_anything(tmp_path: Path,
                                                                                        capsys) -> None:
    (tmp_path / "c.txt").write_text("some text")
    code, _, err = run(capsys, "harvest", "--model", "/nonexistent-model", "--corpus", tmp_path / "c.txt",
                       "--out", "/proc/x.duckdb")
    assert code == 2 and "/proc/x.duckdb: cannot create files in folder /proc" in err
