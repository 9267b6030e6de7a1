"""Bad input: one clear line naming the file and the fix, a non-zero exit, and nothing half-written."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import duckdb
import pytest
import transformers

from featureatlas.cli import main
from featureatlas.store.schema import SCHEMA_VERSION

from helpers.tiny_models import saelens_sae, save_tiny_model, tiny_tokenizer, write_corpus


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_model("llama", root / "model"), write_corpus(root / "corpus")


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def harvest_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["harvest", "--model", model, "--corpus", corpus, "--out", out, "--device", "cpu", *extra]


def assert_nothing_written(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if p.suffix in (".duckdb", ".partial", ".wal")] == []


@pytest.mark.model
def test_harvest_then_info(tiny, tmp_path: Path, capsys) -> None:
    model, corpus = tiny
    out = tmp_path / "s.duckdb"
    assert main([str(a) for a in harvest_args(model, corpus, out, "--layers", "1-2", "--top-k", "3")]) == 0
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "2 layers (1-2)" in info and "units: 96 rows" in info
    assert duckdb.connect(str(out), read_only=True).execute("SELECT layers FROM runs").fetchone()[0] == [1, 2]


@pytest.mark.model
@pytest.mark.parametrize("case, expected", [
    ("missing_model", "no such file or folder"),
    ("folder_without_config", "has no config.json"),
    ("missing_corpus", "no such file or folder"),
    ("corpus_without_text_files", "holds no .txt, .jsonl or .parquet"),
    ("non_utf8", "not UTF-8 (byte 0xff at offset 6)"),
    ("only_empty_documents", "holds no text"),
    ("bad_jsonl", ":2: not a JSON object"),
    ("jsonl_without_field", "no 'text' field; name the text field with --text-field"),
    ("layers_out_of_range", "out of range; this model has layers 0-2"),
    ("layers_garbage", "is not a layer number"),
    ("out_folder_missing", "does not exist"),
    ("unsupported_architecture", "model type 'bloom' is not supported"),
    ("resid_out_of_range", "--resid '3': '3' is out of range"),
    ("odd_intervals", "--intervals must be even"),
    ("sae_not_a_dictionary", "cfg.json"),
    ("sae_for_another_width", "d_in is 24, but blocks.1.hook_resid_post of this model is 32 wide"),
    ("sae_hook_out_of_range", "layer 7 is out of range"),
    ("sae_hook_unknown", "not a hook featureatlas reads"),
])
def test_bad_input_gets_one_clear_line(tiny, tmp_path: Path, capsys, case: str, expected: str) -> None:
    model, corpus = tiny
    out = tmp_path / "s.duckdb"
    extra: list[str] = []
    if case == "missing_model":
        model = tmp_path / "no-such-model"
    elif case == "folder_without_config":
        model = tmp_path / "empty-model"
        model.mkdir()
    elif case == "missing_corpus":
        corpus = tmp_path / "nothing-here"
    elif case == "corpus_without_text_files":
        corpus = tmp_path / "pictures"
        corpus.mkdir()
        (corpus / "x.png").write_bytes(b"\x89PNG")
    elif case == "non_utf8":
        corpus = tmp_path / "latin1.txt"
        corpus.write_bytes(b"caf\xc3\xa9 \xff oops")
    elif case == "only_empty_documents":
        corpus = tmp_path / "empty"
        corpus.mkdir()
        (corpus / "a.txt").write_text("  \n\n")
        (corpus / "b.txt").write_text("")
    elif case == "bad_jsonl":
        corpus = tmp_path / "c.jsonl"
        corpus.write_text('{"text": "fine"}\n{not json}\n')
    elif case == "jsonl_without_field":
        corpus = tmp_path / "c.jsonl"
        corpus.write_text('{"body": "fine"}\n')
    elif case == "layers_out_of_range":
        extra = ["--layers", "1,5"]
    elif case == "layers_garbage":
        extra = ["--layers", "one"]
    elif case == "out_folder_missing":
        out = tmp_path / "missing" / "s.duckdb"
    elif case == "unsupported_architecture":
        model = tmp_path / "bloom"
        transformers.AutoModelForCausalLM.from_config(transformers.BloomConfig(
            vocab_size=300, hidden_size=16, n_layer=1, n_head=2)).save_pretrained(model)
        tiny_tokenizer().save_pretrained(model)
    elif case == "resid_out_of_range":
        extra = ["--resid", "3"]
    elif case == "odd_intervals":
        extra = ["--intervals", "5"]
    elif case == "sae_not_a_dictionary":
        (tmp_path / "notes").mkdir()
        extra = ["--sae", str(tmp_path / "notes")]
    elif case.startswith("sae_"):
        d_in, hook = {"sae_for_another_width": (24, "blocks.1.hook_resid_post"),
                      "sae_hook_out_of_range": (32, "blocks.7.hook_resid_post"),
                      "sae_hook_unknown": (32, "blocks.1.hook_resid_sideways")}[case]
        extra = ["--sae", str(saelens_sae(tmp_path / "sae", d_in, hook, seed=0))]
    code, message = run(capsys, *harvest_args(model, corpus, out, *extra))
    assert code == 2
    assert message.startswith("featureatlas harvest: error: ") and expected in message, message
    assert_nothing_written(tmp_path)


@pytest.mark.model
def test_train_sae_then_harvest_its_features(tiny, tmp_path: Path, capsys) -> None:
    model, corpus = tiny
    sae = tmp_path / "sae"
    assert main(["train-sae", "--model", str(model), "--corpus", str(corpus), "--hook", "blocks.1.hook_resid_post",
                 "--out", str(sae), "--features", "64", "--k", "4", "--tokens", "1200", "--steps", "30",
                 "--context-length", "16"]) == 0
    report = capsys.readouterr().out
    assert "variance unexplained" in report and "L0 4.0" in report and "dead" in report
    assert (sae / "cfg.json").is_file() and (sae / "sae_weights.safetensors").is_file()
    code, message = run(capsys, "train-sae", "--model", str(model), "--corpus", str(corpus), "--hook",
                        "blocks.1.hook_resid_post", "--out", str(sae))
    assert code == 2 and "already exists" in message  # a finished SAE is never silently replaced
    out = tmp_path / "s.duckdb"
    assert main([str(a) for a in harvest_args(model, corpus, out, "--layers", "none", "--sae", f"mine={sae}")]) == 0
    con = duckdb.connect(str(out), read_only=True)
    assert con.execute("SELECT source, layer, n_units, architecture FROM sources").fetchall() == [
        ("sae:mine", 1, 64, "topk")]


@pytest.mark.model
def test_train_a_transcoder_then_harvest_its_features(tiny, tmp_path: Path, capsys) -> None:
    model, corpus = tiny
    run_folder = tmp_path / "tc"
    code, message = run(capsys, "train-sae", "--model", model, "--corpus", corpus, "--transcode", "--hook",
                        "blocks.1.hook_mlp_out", "--out", run_folder)
    assert code == 2 and "layers.15.mlp" in message and not run_folder.exists()  # a module path, as sparsify's
    assert main(["train-sae", "--model", str(model), "--corpus", str(corpus), "--transcode", "--hook",
                 "layers.1.mlp", "--out", str(run_folder), "--features", "64", "--k", "4", "--tokens", "1200",
                 "--steps", "30", "--context-length", "16"]) == 0
    report = capsys.readouterr().out
    assert "transcoder" in report and "layers.1.mlp's output from its input" in report and "L0 " in report
    assert (run_folder / "layers.1.mlp" / "sae.safetensors").is_file()
    out = tmp_path / "s.duckdb"
    assert main([str(a) for a in harvest_args(model, corpus, out, "--layers", "none", "--sae",
                                              f"mlp1={run_folder}")]) == 0
    con = duckdb.connect(str(out), read_only=True)
    assert con.execute("SELECT source, kind, layer, n_units, architecture, hook_name, hook_out_name "
                       "FROM sources").fetchall() == [
        ("transcoder:mlp1", "transcoder", 1, 64, "topk_transcoder", "layers.1.mlp", "layers.1.mlp")]
    assert con.execute("SELECT count(*) FROM examples WHERE example_kind = 'top'").fetchone()[0] > 0
    con.close()
    assert main(["info", str(out)]) == 0
    assert "transcoder:mlp1 (topk_transcoder on layers.1.mlp): 64 units in layer 1\n" in capsys.readouterr().out


@pytest.mark.model
def test_store_of_another_schema_version_is_refused(tiny, tmp_path: Path, capsys) -> None:
    model, corpus = tiny
    out = tmp_path / "s.duckdb"
    assert main([str(a) for a in harvest_args(model, corpus, out, "--layers", "0")]) == 0
    for version in ("999", str(SCHEMA_VERSION - 1)):  # a newer store, and one written before this version
        con = duckdb.connect(str(out))
        con.execute("UPDATE t_meta SET value = ? WHERE key = 'schema_version'", [version])
        con.close()
        for command in (["info", out], ["build", out, "--out", tmp_path / "site"]):
            code, message = run(capsys, *command)
            assert code == 2 and f"store schema version {version}, this featureatlas reads version " \
                f"{SCHEMA_VERSION}; harvest it again" in message
    assert not (tmp_path / "site").exists()


def test_not_a_store_is_refused(tmp_path: Path, capsys) -> None:
    bogus = tmp_path / "bogus.duckdb"
    bogus.write_text("hello")
    code, message = run(capsys, "info", bogus)
    assert code == 2 and "not a featureatlas store" in message


@pytest.mark.model
def test_crash_mid_harvest_leaves_no_store(tiny, tmp_path: Path, monkeypatch) -> None:
    model, corpus = tiny
    from featureatlas.harvest import run as run_module

    def explode(*args, **kwargs):
        raise RuntimeError("simulated crash")
    monkeypatch.setattr(run_module, "write_source", explode)  # after every batch, while the store is half-written
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([str(a) for a in harvest_args(model, corpus, tmp_path / "s.duckdb")])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.model
def test_harvest_killed_outright_leaves_no_store_and_next_run_cleans_up(tiny, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time
    model, corpus = tiny
    big = tmp_path / "big.txt"
    big.write_text((corpus / "a.txt").read_text() * 400)
    out = tmp_path / "s.duckdb"
    proc = subprocess.Popen([sys.executable, "-m", "featureatlas", *map(str, harvest_args(model, big, out)),
                             "--batch-size", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".s.duckdb.*.partial")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.glob(".s.duckdb.*"))
    assert leftovers  # a SIGKILL cannot clean up ...
    assert main([str(a) for a in harvest_args(model, corpus, out, "--layers", "0")]) == 0
    assert out.is_file() and list(tmp_path.glob(".s.duckdb.*")) == []  # ... the next run does


@pytest.mark.model
def test_uncached_hub_id_offline_fails_fast(tiny, tmp_path: Path, capsys, monkeypatch) -> None:
    model, corpus = tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, message = run(capsys, *harvest_args("someone/no-such-model", corpus, tmp_path / "s.duckdb"))
    assert code == 2 and "someone/no-such-model: not in the local Hugging Face cache" in message
    assert_nothing_written(tmp_path)


def test_allocator_keeps_freed_memory_unless_the_user_set_malloc(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Linux with glibc the command raises malloc's thresholds (featureatlas/allocator.py); a user's own
    MALLOC_* or GLIBC_TUNABLES settings are left alone."""
    from featureatlas.allocator import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected


@pytest.mark.model
@pytest.mark.parametrize("flag, expected", [((), True), (("--cuda-graphs", "off"), False),
                                            (("--cuda-graphs", "on"), True)])
def test_cuda_graphs_flag_reaches_the_harvest(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              flag: tuple[str, ...], expected: bool) -> None:
    """On by default (it only acts on CUDA with the fixed-shape steps); `off` is the way around a driver that
    cannot record graphs."""
    from featureatlas.harvest import run as run_module
    seen = []

    def fake_harvest(config: run_module.HarvestConfig, loaded: object = None) -> run_module.HarvestSummary:
        seen.append(config.cuda_graphs)
        return run_module.HarvestSummary(config.out, 1, 1, 1, 1.0, 1.0)

    monkeypatch.setattr(run_module, "harvest", fake_harvest)
    model, corpus = tiny
    assert main([str(a) for a in harvest_args(model, corpus, tmp_path / "s.duckdb", *flag)]) == 0
    assert seen == [expected]


@pytest.mark.parametrize("argv, expected", [
    (["harvest", "--model", "m", "--corpus", "c", "--out", "o"], ("featureatlas.harvest.config", "HarvestConfig",
                                                                   {"model": "m", "corpus": Path("c"),
                                                                    "out": Path("o")})),
    (["train-sae", "--model", "m", "--corpus", "c", "--hook", "h", "--out", "o"],
     ("featureatlas.harvest.config", "TrainSaeConfig", {"model": "m", "corpus": Path("c"), "hook": "h",
                                                        "out": Path("o")})),
    (["verify", "s.duckdb"], ("featureatlas.harvest.verify", "VerifyConfig", {"store": Path("s.duckdb")})),
])
def test_the_options_default_to_the_settings_defaults(argv: list[str], expected: tuple[str, str, dict]) -> None:
    """Each option is made from its settings field, so the command line and the library share every default."""
    import importlib

    from featureatlas.cli import parser
    from featureatlas.commands.options import settings_from

    module, name, required = expected
    cls = getattr(importlib.import_module(module), name)
    top, _ = parser(argv[0])
    assert settings_from(top.parse_args(argv), cls) == cls(**required)


def test_the_demo_harvests_with_the_harvest_defaults_but_its_own() -> None:
    from featureatlas.cli import parser
    from featureatlas.commands.demo import DEMO_HEADS, DEMO_SAE_STEPS, DEMO_TOKENS
    from featureatlas.commands.options import settings_from
    from featureatlas.harvest.config import HarvestConfig, TrainSaeConfig

    top, _ = parser("demo")
    args = top.parse_args(["demo"])
    config = settings_from(args, HarvestConfig, model="m", corpus=Path("c"))
    assert config == HarvestConfig(model="m", corpus=Path("c"), out=Path("demo"), tokens=DEMO_TOKENS, resid="all",
                                   heads=DEMO_HEADS)
    trained = TrainSaeConfig(hook="h", corpus=Path("c"), out=Path("o"), model="m")
    assert (args.sae_features, args.sae_k, args.sae_tokens, args.sae_steps) == (
        trained.features, trained.k, trained.tokens, DEMO_SAE_STEPS)


@pytest.mark.model
def test_library_errors_name_the_setting_and_the_command_line_its_flag(tiny, tmp_path: Path, capsys) -> None:
    from featureatlas.errors import UsageError, setting_name
    from featureatlas.harvest.config import HarvestConfig, validate

    model, corpus = tiny
    out = tmp_path / "s.duckdb"
    with pytest.raises(UsageError) as raised:
        validate(HarvestConfig(model=str(model), corpus=corpus, out=out, context_length=1))
    assert str(raised.value) == "context_length must be at least 2"
    code, message = run(capsys, *harvest_args(model, corpus, out, "--context-length", "1"))
    assert (code, message) == (2, "featureatlas harvest: error: --context-length must be at least 2")
    code, message = run(capsys, "train-sae", "--model", model, "--corpus", corpus, "--hook", "blocks.1.hook_resid_post",
                        "--out", tmp_path / "sae", "--k", "9", "--features", "8")
    assert (code, message) == (2, "featureatlas train-sae: error: --k must be at least 1 and at most --features")
    assert_nothing_written(tmp_path)

    # A setting whose flag is named otherwise is shown as that flag; one the command lacks keeps its name; a path
    # that spells a setting's name is left as it is.
    err = UsageError(f"/data/saes/out: {setting_name('saes')} and {setting_name('split')}; choose another "
                     f"{setting_name('out')}")
    assert str(err) == "/data/saes/out: saes and split; choose another out"
    assert err.naming({"saes": "--sae", "out": "--out"}.get) == "/data/saes/out: --sae and split; choose another --out"


@pytest.mark.model
def test_bad_option_text_is_one_argparse_line(tiny, tmp_path: Path, capsys) -> None:
    model, corpus = tiny
    for flag, value, expected in (("--shard", "1of2", "argument --shard: '1of2': want I/N, e.g. 0/8"),
                                  ("--cuda-graphs", "maybe", "argument --cuda-graphs: 'maybe': choose on or off")):
        with pytest.raises(SystemExit) as raised:
            main([str(a) for a in harvest_args(model, corpus, tmp_path / "s.duckdb", flag, value)])
        assert raised.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(expected)


def test_the_command_line_starts_without_the_model_libraries() -> None:
    """Listing the commands and reading the options of every command import neither torch nor transformers: they
    load when a command runs."""
    import subprocess

    code = ("import sys\nfrom featureatlas.cli import COMMANDS, parser\n"
            "for command in [None, *COMMANDS]:\n    parser(command)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_library_errors_spell_no_flags() -> None:
    """The library's own error messages name settings (setting_name), never a command line's flags: a notebook
    user has no flags, and the command line maps each setting to its own. Text in backquotes (a whole command to
    run, e.g. `featureatlas harvest --shard ...`) is left alone; errors that are not FeatureAtlasErrors too."""
    import ast
    import re

    from featureatlas import errors

    ours = {name for name, value in vars(errors).items()
            if isinstance(value, type) and issubclass(value, errors.FeatureAtlasError)}
    ours |= {"CorpusError", "DictionaryError", "AnnotationError", "ModelLoadError", "SiteError", "StoreError"}
    root = Path(__file__).resolve().parents[1]
    found = []
    for folder in ("harvest", "load", "store", "build", "export", "annotate", "explain", "serve"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                    continue
                name = getattr(node.exc.func, "id", getattr(node.exc.func, "attr", ""))
                if name not in ours or not node.exc.args:
                    continue
                text = "".join(part.value for part in ast.walk(node.exc.args[0])
                               if isinstance(part, ast.Constant) and isinstance(part.value, str))
                if re.search(r"(?<![\w-])--[a-z]", re.sub(r"`[^`]*`", "", text)):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {text[:80]!r}")
    assert not found, "\n".join(found)
