"""`featureatlas probe` and featureatlas.notebook: a probe of a stored context gives the stored activations, --top
ranks as a brute force does, bad input is one line, and nothing hostile reaches a terminal or a notebook raw."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest

from featureatlas.cli import main
from featureatlas.commands.probe import ProbeArgs, probe_command
from featureatlas.errors import UsageError
from featureatlas.harvest.probe import MAX_CHARS, load_prober
from featureatlas.notebook import highlight, open_atlas

from helpers.tiny_models import harvest_small_store

HOSTILE = '<script>alert("x")</script>\u202e\x1b[31m'


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    store, model, _ = harvest_small_store(tmp_path_factory.mktemp("probe"))
    return store, model


@pytest.fixture(scope="module")
def prober(harvested):
    return load_prober(store=harvested[0])


def tolerance(stored: np.ndarray) -> float:
    """Batch shape and padding reorder float32 sums (1e-5 of the scale, as verify allows); a store may also keep
    activations on a 16-bit grid (store/encoding.py, where present)."""
    try:
        from featureatlas.store.encoding import ROUNDING
    except ImportError:
        ROUNDING = 0.0  # noqa: N806
    return float(np.abs(stored).max()) * (1e-5 + ROUNDING)


def examples(store: Path, where: str = "TRUE") -> list[tuple]:
    con = duckdb.connect(str(store), read_only=True)
    try:
        return con.execute(
            "SELECT e.source, e.layer, e.unit, e.max_position, e.max_activation, e.activations, c.token_ids, "
            f"c.tokens, c.start_token FROM examples e JOIN contexts c USING (context_id) WHERE {where} "
            "ORDER BY e.source, e.layer, e.unit, e.example_kind, e.rank").fetchall()
    finally:
        con.close()


@pytest.mark.model
def test_probe_equals_stored_examples_api(harvested, prober) -> None:
    store, _ = harvested
    checked = exact = 0
    for source, layer, unit, position, value, acts, ids, _, _ in examples(store, "e.example_kind = 'top' AND "
                                                                          "e.rank = 1 AND e.unit % 5 = 0"):
        result = prober.unit(None, f"{source}/{layer}/{unit}", token_ids=ids)
        stored = np.asarray(acts, dtype=np.float32)
        assert result.activations.shape == stored.shape
        assert np.abs(result.activations - stored).max() <= tolerance(stored), (source, layer, unit)
        assert result.max_position == position and abs(result.max_activation - value) <= tolerance(stored)
        checked += 1
        exact += bool((result.activations == stored).all())
    assert checked > 20 and {s for s, *_ in examples(store)} == {"mlp", "resid", "sae:res1"}
    assert exact > 0  # many recompute bit for bit


@pytest.mark.model
def test_probe_cli_plain_equals_stored_example(harvested, prober, capsys) -> None:
    store, _ = harvested
    tokenizer = prober.tokenizer
    def retokenises(row: tuple) -> bool:
        ids, tokens, start = row[6:9]
        return start == 0 and tokenizer("".join(tokens[1:]), add_special_tokens=False)["input_ids"] == ids[1:]

    found = [row for row in examples(store, "e.example_kind = 'top'") if retokenises(row)]
    assert found, "no stored context re-tokenises to itself"
    source, layer, unit, position, _, acts, ids, tokens, _ = found[0]
    text = "".join(tokens[1:])
    assert main(["probe", "--store", str(store), text, "--unit", f"{source}/{layer}/{unit}"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out  # piped (not a TTY): plain lines, no ANSI
    lines = [line.rsplit("\t", 1) for line in out.splitlines()]
    assert len(lines) == len(ids) and all(len(parts) == 2 for parts in lines)
    values = np.array([float(v) for _, v in lines], dtype=np.float32)
    stored = np.asarray(acts, dtype=np.float32)
    assert np.abs(values - stored).max() <= tolerance(stored)
    assert int(values[1:].argmax()) + 1 == position


@pytest.mark.model
def test_top_matches_brute_force(harvested, prober, capsys) -> None:
    store, _ = harvested
    text = "whether the quick fox is lazy"
    assert main(["probe", "--store", str(store), text, "--top", "6", "--source", "mlp", "--layer", "1",
                 "--plain"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    ids = prober.token_ids(text)
    tokens = prober.display(ids)
    brute = sorted(((float(prober.unit(text, f"mlp/1/{u}").activations[1:].max()), u) for u in range(48)),
                   key=lambda t: (-t[0], t[1]))[:6]
    assert [r[0] for r in rows] == [f"mlp/1/{u}" for _, u in brute]
    assert [float(r[1]) for r in rows] == pytest.approx([v for v, _ in brute], rel=1e-6)
    assert all(r[3] == tokens[int(r[2])] for r in rows)  # the token at the max's position (plain ASCII here)
    # the SAE's one layer may be left out; its ranking comes from the same path
    assert main(["probe", "--store", str(store), text, "--top", "3", "--source", "sae:res1", "--plain"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


@pytest.mark.model
def test_model_mode_and_site_link(harvested, tmp_path: Path, capsys) -> None:
    store, model = harvested
    site = tmp_path / "site"
    site.mkdir()
    code = main(["probe", "--model", str(model), "--device", "cpu", "--dtype", "float32", "the fox", "--top", "2",
                 "--source", "resid", "--layer", "2", "--site", str(site)])
    assert code == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[0][0].startswith("resid/2/")
    assert rows[0][4] == f"{(site / 'model' / 'resid' / '2' / 'unit.html').resolve().as_uri()}#{rows[0][0][8:]}"


@pytest.mark.model
def test_terminal_output_is_shaded_and_hostile_tokens_are_defused(harvested) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    assert probe_command(ProbeArgs(text="the fox " + HOSTILE, unit="mlp/1/7", store=harvested[0]), out) == 0
    shown = out.getvalue()
    assert "\x1b[48;2;" in shown  # ANSI background shades
    assert "\x1b[31m" not in shown and "\u202e" not in shown and "\\x1b" in shown and "\\u202e" in shown
    assert "mlp/1/7 on " in shown and "the unit's max" in shown


@pytest.mark.model
@pytest.mark.parametrize("argv, expected", [
    (["--unit", "sae:nope/1"], "no source 'sae:nope' in the store"),
    (["--unit", "mlp/1/999"], "no unit 999 in mlp layer 1, which has units 0-47"),
    (["--unit", "mlp/7/1"], "no layer 7"),
    (["--top", "3", "--source", "mlp", "--layer", "9"], "--layer 9: no such layer in mlp"),
    (["--top", "3", "--source", "mlp"], "pass --layer"),
    ([], "pass either --unit ADDRESS or --top N"),
])
def test_bad_input_gets_one_line(harvested, capsys, argv: list[str], expected: str) -> None:
    code = main(["probe", "--store", str(harvested[0]), "some text", *argv])
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if not line.startswith("Loading weights")]
    assert code == 2 and captured.out == "" and len(err) == 1 and expected in err[0], captured.err


@pytest.mark.model
@pytest.mark.parametrize("case, expected", [
    ("empty", "no text to probe"),
    ("long", f"probe takes at most {MAX_CHARS:,}"),
    ("missing_store", "no such store"),
    ("no_model", "pass --model MODEL, or --store STORE"),
])
def test_bad_text_and_store_get_one_line(harvested, tmp_path: Path, capsys, case: str, expected: str) -> None:
    args = ["--store", str(harvested[0]), "   "]
    if case == "long":
        args[2] = "x" * (MAX_CHARS + 1)
    elif case == "missing_store":
        args = ["--store", str(tmp_path / "gone.duckdb"), "text"]
    elif case == "no_model":
        args = ["text"]
    code = main(["probe", *args, "--unit", "mlp/1/1"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and len(captured.err.splitlines()) == 1
    assert expected in captured.err


@pytest.mark.model
def test_stdin_text(harvested, prober, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("the fox\n"))
    assert main(["probe", "--store", str(harvested[0]), "-", "--unit", "mlp/1/7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(prober.token_ids("the fox"))  # echo's trailing newline is not probed
    assert "".join(line.split("\t")[0] for line in lines[1:]) == "the fox"


@pytest.mark.model
def test_notebook_unit_and_probe(harvested, tmp_path: Path) -> None:
    store = shutil.copy(harvested[0], tmp_path / "hostile.duckdb")
    con = duckdb.connect(str(store))
    context_id = con.execute("SELECT context_id FROM examples WHERE source = 'mlp' AND layer = 1 AND unit = 7 AND "
                             "example_kind = 'top' AND rank = 1").fetchone()[0]
    tokens = con.execute("SELECT tokens FROM t_contexts WHERE context_id = ?", [context_id]).fetchone()[0]
    tokens[1], tokens[2] = "<script>alert(1)</script>", "\u202e<img src=x onerror=alert(1)>"
    con.execute("UPDATE t_contexts SET tokens = ? WHERE context_id = ?", [tokens, context_id])
    con.close()

    atlas = open_atlas(store)
    unit = atlas.unit("L1 N7")
    assert unit.address == "mlp/1/7" and unit.statistics["n_tokens"] == 500
    assert set(unit.statistics) >= {"max_activation", "min_activation", "frequency", "mean", "std"}
    frame = unit.examples()
    assert len(frame) > 3 and {"kind", "rank", "tokens", "activations", "max_activation"} <= set(frame.columns)
    assert len(unit.logits()) == 6
    page = unit._repr_html_()
    assert "<script" not in page.lower() and "<img" not in page and "\u202e" not in page
    assert "&lt;script&gt;" in page and "\\u202e" in page and "hsl(24 100%" in page

    result = atlas.probe("the fox " + HOSTILE, unit="mlp/1/7")
    assert len(result.tokens) == len(result.activations) and result.tokens[0] == "<bos>"
    shown = result._repr_html_()
    assert "<script" not in shown.lower() and "\u202e" not in shown and "\x1b" not in shown
    assert "&lt;script&gt;" in shown or "&lt;" in shown
    ids = atlas.prober().token_ids("the fox")  # a causal model: the text's start reads as it does alone
    alone = atlas.prober().unit(None, "mlp/1/7", token_ids=ids).activations
    assert result.activations[:len(ids)] == pytest.approx(alone, rel=1e-5, abs=1e-5)
    tops = atlas.probe("the fox", top=2, source="mlp", layer=1)
    assert len(tops) == 2 and tops[0].max_activation >= tops[1].max_activation


@pytest.mark.model
def test_a_moved_dictionary_is_found_as_verify_finds_it(harvested, prober, tmp_path: Path, capsys) -> None:
    """probe, serve --store and the notebook reopen a store's run as verify does: a recorded dictionary folder that
    is gone is verify's one line, before any model loads, and NAME=PATH says where it is now."""
    store = Path(shutil.copy(harvested[0], tmp_path / "moved.duckdb"))
    sae = Path(shutil.copytree(harvested[0].parent / "sae", tmp_path / "elsewhere"))
    gone = tmp_path / "moved-away" / "sae"
    con = duckdb.connect(str(store))
    con.execute("UPDATE t_sources SET dictionary_path = ? WHERE source = 'sae:res1'", [str(gone)])
    con.close()
    line = f"source sae:res1 (layer 1): its dictionary folder {gone} is gone; pass --sae res1=PATH with the " \
           "folder's new place"
    for argv in (["probe", "--store", str(store), "the fox", "--unit", "mlp/1/7"], ["verify", str(store)]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.splitlines()[-1:] == [f"featureatlas {argv[0]}: error: {line}"]
    with pytest.raises(UsageError, match="its dictionary folder .* is gone"):
        open_atlas(store).prober()

    atlas = open_atlas(store, saes=[f"res1={sae}"])
    ids = prober.token_ids("the quick fox")
    moved = atlas.prober().unit(None, "sae:res1/3", token_ids=ids)
    assert moved.activations.tolist() == prober.unit(None, "sae:res1/3", token_ids=ids).activations.tolist()
    assert atlas.prober().sources.keys() == prober.sources.keys()


def test_highlight_escapes_every_token() -> None:
    shown = highlight(["<bos>", "<script>", "\u202e", "a&b", '"'], [9.0, 1.0, -1.0, 0.5, 0.0], 1.0, first=1)
    assert "<script" not in shown and "&lt;bos&gt;" in shown and "&amp;" in shown and "\u202e" not in shown
    assert "hsl(214 90%" in shown and "hsl(24 100% 53%)" in shown
