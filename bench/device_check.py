"""One-shot check of the CUDA code paths, and GPU benchmarks of the harvest, for a machine lent for minutes.

    python bench/device_check.py [--device cuda|cpu] [--small] [--only STAGES] [--skip STAGES] [--out DIR]
                                 [--budget SECONDS] [--whole T1,T2,MEMORY,FACTOR] [--work DIR] [--keep]

bench/device_check.sh is the command to run on the GPU machine (it installs the wheels the machine lacks first).
Here, `python bench/device_check.py --device cpu --small` runs every stage end to end on small sizes.

Stages, in order (--only/--skip take stage names or the groups `checks` and `speed`; each stage is timed, a failing
stage prints its traceback and the next one runs; none starts once the budget is spent):
  env           versions, the GPU, TF32 settings, the C compiler Inductor needs
  primitives    device ops against CPU (ldexp, NaN to int, stable sorts, histogram codes, the fused reducer) and
                every accumulator (top/bottom-k, statistics, quantile and random samples) fed the very same
                activations on CPU and on the device: their states must be equal (float sums within 1e-5)
  correctness   a tiny random LLaMA (neurons, --resid, a top-k SAE with dead features) harvested on CPU float32 and
                on the device in float32 (compile auto, off, on; CUDA graphs on and off) and bfloat16; the stores
                compared
  bench-neurons bench/harvest.py on a random model shaped as SmolLM2-135M, bfloat16, all MLP neurons
  bench-wide    bench-neurons with batches of 4 times as many contexts (half as many batches)
  bench-whole   bench/harvest_whole.py (whole processes: harvest against bare forward, and peak memory)
  profile       bench-neurons' model without CUDA graphs, 3 harvest steps under torch.profiler (GPU time a kernel)
  bench-sae     the same model as bench-neurons, a random 16k-feature top-k SAE on blocks.15.hook_resid_post only
  bench-1b      bench/harvest.py on a random ~1B LLaMA, neurons only
  bench-resid   bench-neurons with --resid (neurons and residual dimensions)
  verify        `featureatlas verify` of the device stores (float32, bfloat16), and of the float32 one on CPU
  torchrun      `torchrun --nproc-per-node 1 -m featureatlas harvest` on the device, `--nproc-per-node 2` with gloo
                on CPU; each compared with its single-process store
Everything printed goes to stdout (device_check.sh tees it to OUT/device_check.log); OUT/device_check.json gets
each stage's status and key numbers, rewritten after every stage. Exit status 0 when every stage that ran passed.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "bench" / "device_assets"
CORPUS_ASSET = ASSETS / "shakespeare.jsonl.gz"          # 42 plays (the embedded corpus), 1.56M SmolLM2 tokens
TOKENIZER_ASSET = ASSETS / "smollm2_tokenizer.json.gz"  # SmolLM2-135M-Instruct's tokenizer.json

# SmolLM2-135M(-Instruct)'s config.json, as the embedded model's converted copy has it; random weights stand in.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
                    max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                    eos_token_id=2, pad_token_id=2, attention_bias=False, mlp_bias=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
LLAMA_1B = dict(SMOLLM2_135M, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64)  # 1.07B parameters, 131,072 MLP neurons
SMOLLM2_SPECIAL = dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                       unk_token="<|endoftext|>")


@dataclass(frozen=True)
class Sizes:
    tiny_tokens: int          # tokens of each correctness harvest
    tiny_batch: int
    prim_shape: tuple         # (batch, tokens, units, batches) of the synthetic accumulator check
    speed_model: dict
    big_model: dict
    bench_dtype: str
    bench_batch: int
    bench_batches: int
    big_batches: int
    bench_compile: str        # bench/harvest.py's and harvest_whole.py's --compile
    sae_features: int
    sae_k: int
    sae_layer: int
    whole: tuple              # (t1, t2, memory tokens, memory factor)


FULL = Sizes(tiny_tokens=20_000, tiny_batch=32, prim_shape=(32, 64, 512, 8), speed_model=SMOLLM2_135M,
             big_model=LLAMA_1B, bench_dtype="bfloat16", bench_batch=64, bench_batches=40, big_batches=20,
             bench_compile="on", sae_features=16384, sae_k=32, sae_layer=15, whole=(200_000, 600_000, 100_000, 10))
SMALL = Sizes(tiny_tokens=4_000, tiny_batch=16, prim_shape=(8, 16, 64, 4),
              speed_model=dict(SMOLLM2_135M, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=32),
              big_model=dict(SMOLLM2_135M, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32),
              bench_dtype="float32", bench_batch=8, bench_batches=4, big_batches=2, bench_compile="off",
              sae_features=256, sae_k=16, sae_layer=1, whole=(1_000, 3_000, 1_000, 2))

# name, group, the most seconds its subprocesses may run (in-process work has only the watchdog), the seconds it
# needs to be worth starting
STAGES = [("env", "checks", 30, 1), ("primitives", "checks", 90, 10), ("correctness", "checks", 150, 20),
          ("bench-neurons", "speed", 150, 30), ("bench-wide", "speed", 120, 30), ("bench-whole", "speed", 240, 60),
          ("profile", "speed", 90, 30), ("bench-sae", "speed", 90, 30), ("bench-1b", "speed", 150, 45),
          ("bench-resid", "speed", 90, 30),
          ("verify", "checks", 90, 15), ("torchrun", "checks", 120, 30)]
GRACE = 20  # seconds past the budget before the watchdog stops everything (in-process stages cannot be cut)


# -- bookkeeping ------------------------------------------------------------------------------------------------

class Summary:
    def __init__(self, path: Path, args: argparse.Namespace):
        self.path = path
        self.data: dict = {"device": args.device, "small": args.small, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "budget_s": args.budget, "stages": {}, "ok": None}
        self.lock = threading.Lock()

    def stage(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, {})

    def write(self) -> None:
        with self.lock:
            statuses = [s.get("status") for s in self.data["stages"].values()]
            self.data["ok"] = all(s in ("ok", "skipped") for s in statuses)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable) + "\n")
            os.replace(tmp, self.path)


def _jsonable(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    try:
        return float(x)  # numpy and torch scalars
    except (TypeError, ValueError):
        return str(x)


class StageFailed(Exception):
    """A check that ran but did not pass: its message says which numbers were off."""


def say(*parts: object) -> None:
    print(*parts, flush=True)


def header(text: str) -> None:
    say(f"\n{'=' * 100}\n== {text}\n{'=' * 100}")


_child: subprocess.Popen | None = None  # the subprocess running now, for the watchdog


def run_streamed(cmd: list[str], timeout: float, env: dict | None = None, prefix: str = "  | ") -> tuple[int | None,
                                                                                                         str]:
    """Run cmd, printing its output as it comes (tqdm's carriage-return redraws folded to their last state);
    returns (exit status or None when it ran past timeout and was killed, the whole output)."""
    global _child
    say(f"$ {shlex.join(cmd)}   (timeout {timeout:.0f}s)")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                            start_new_session=True, stdin=subprocess.DEVNULL)
    _child = proc
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n").split("\r")[-1]
            lines.append(line)
            say(prefix + line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        say(f"!! timed out after {timeout:.0f}s; stopping it")
        _kill_group(proc)
        rc = None
    reader.join(timeout=5)
    _child = None
    return rc, "\n".join(lines)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


# A small process started before this one imports torch, that starts commands for it: Linux carries a process's
# peak RSS across fork and exec, so bench/harvest_whole.py's children, started from here, would all report at least
# this process's peak (GBs once models were made) instead of their own.
_SPAWNER_CODE = r"""
import json, subprocess, sys
for line in sys.stdin:
    req = json.loads(line)
    try:
        with open(req["log"], "wb") as log:
            p = subprocess.Popen(req["cmd"], cwd=req["cwd"], env=req["env"], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            print(json.dumps({"pid": p.pid}), flush=True)
            rc = p.wait()
    except Exception as err:
        print(json.dumps({"error": repr(err)}), flush=True)
        continue
    print(json.dumps({"rc": rc}), flush=True)
"""
_spawner: subprocess.Popen | None = None
_child_pid: int | None = None  # a command the spawner runs now, for the watchdog


def start_spawner() -> None:
    global _spawner
    try:
        _spawner = subprocess.Popen([sys.executable, "-c", _SPAWNER_CODE], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, bufsize=1)
    except OSError as err:
        say(f"note: no spawner ({err}); bench-whole's peak RSS will include this process's")


def run_spawned(cmd: list[str], timeout: float, env: dict, log: Path, prefix: str = "  | ") -> tuple[int | None,
                                                                                                     str]:
    """As run_streamed, but started by the spawner (so with its small peak RSS), output through a log file."""
    global _child_pid
    if _spawner is None or _spawner.poll() is not None:
        say("note: the spawner is gone; starting it from here (peak RSS figures include this process's)")
        return run_streamed(cmd, timeout, env, prefix)
    assert _spawner.stdin is not None and _spawner.stdout is not None
    say(f"$ {shlex.join(cmd)}   (timeout {timeout:.0f}s; started by the spawner)")
    _spawner.stdin.write(json.dumps({"cmd": cmd, "cwd": str(REPO), "env": env, "log": str(log)}) + "\n")
    _spawner.stdin.flush()
    started = json.loads(_spawner.stdout.readline() or "{}")
    if "pid" not in started:
        raise StageFailed(f"the spawner could not start {cmd[:3]}: {started}")
    _child_pid = started["pid"]
    done: dict = {}
    waiter = threading.Thread(target=lambda: done.update(json.loads(_spawner.stdout.readline() or "{}")),
                              daemon=True)
    waiter.start()
    lines: list[str] = []
    position, pending, killed = 0, b"", False
    end = time.monotonic() + max(timeout, 1)

    def tail() -> None:
        nonlocal position, pending
        try:
            with open(log, "rb") as f:
                f.seek(position)
                chunk = f.read()
        except OSError:
            return
        position += len(chunk)
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace").split("\r")[-1]
            lines.append(line)
            say(prefix + line)

    while waiter.is_alive():
        waiter.join(0.5)
        tail()
        if not killed and time.monotonic() > end:
            say(f"!! timed out after {timeout:.0f}s; stopping it")
            _kill_pid_group(_child_pid)
            killed = True
    tail()
    if pending:
        lines.append(pending.decode(errors="replace"))
        say(prefix + lines[-1])
    _child_pid = None
    return (None if killed else done.get("rc")), "\n".join(lines)


def _kill_pid_group(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        for _ in range(50):
            time.sleep(0.1)
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return


def child_env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- context shared by the stages -------------------------------------------------------------------------------

class Ctx:
    def __init__(self, args: argparse.Namespace, work: Path, summary: Summary, deadline: float):
        self.args = args
        self.dev = args.device
        self.sizes = SMALL if args.small else FULL
        self.work = work
        self.summary = summary
        self.deadline = deadline
        self._tiny: dict | None = None
        self._stores: dict[str, Path] = {}
        self._failed: dict[str, str] = {}  # harvests that raised: not run again by a later stage
        self._speed_model: Path | None = None
        self._big_model: Path | None = None
        self._sae16k: Path | None = None
        self._corpus: Path | None = None
        self.stage_budget = math.inf  # the running stage's own limit (STAGES), for its subprocesses

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # - the tiny model, its corpus and SAE ------------------------------------------------------------------

    def tiny(self) -> dict:
        if self._tiny is None:
            self._tiny = make_tiny(self.work / "tiny")
        return self._tiny

    def harvest_params(self, name: str) -> dict:
        """The settings of each named correctness harvest (also given to torchrun as command-line options)."""
        cpu = dict(device="cpu", dtype="float32", compile="auto")
        runs = {"cpu-f32": cpu, "dev-f32": dict(device=self.dev, dtype="float32", compile="auto"),
                "dev-f32-off": dict(device=self.dev, dtype="float32", compile="off"),
                "dev-f32-on": dict(device=self.dev, dtype="float32", compile="on"),
                "dev-bf16": dict(device=self.dev, dtype="bfloat16", compile="auto"),
                "dev-f32-nographs": dict(device=self.dev, dtype="float32", compile="auto", cuda_graphs=False),
                "cpu-f32-off": dict(device="cpu", dtype="float32", compile="off")}
        tiny = self.tiny()
        return dict(model=str(tiny["model"]), corpus=str(tiny["corpus"]), tokens=self.sizes.tiny_tokens,
                    context_length=64, top_k=10, layers="all", resid="all", saes=[str(tiny["sae"])],
                    batch_size=self.sizes.tiny_batch, **runs[name])

    def store(self, name: str) -> Path:
        """The store of a named harvest, run in this process the first time it is asked for."""
        if name in self._failed:
            raise StageFailed(f"harvest {name} failed earlier: {self._failed[name]}")
        if name not in self._stores:
            from featureatlas.harvest.run import HarvestConfig, harvest
            p = self.harvest_params(name)
            out = self.work / "stores" / f"{name}.duckdb"
            out.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            try:
                summary = harvest(HarvestConfig(
                    model=p["model"], corpus=Path(p["corpus"]), out=out, tokens=p["tokens"],
                    context_length=p["context_length"], top_k=p["top_k"], layers=p["layers"], resid=p["resid"],
                    saes=p["saes"], batch_size=p["batch_size"], device=p["device"], dtype=p["dtype"],
                    compile=p["compile"], cuda_graphs=p.get("cuda_graphs", True), overwrite=True,
                    progress=False))
            except Exception as err:
                self._failed[name] = f"{type(err).__name__}: {err}"[:500]
                say(f"!! harvest {name} ({p['device']}, {p['dtype']}, compile {p['compile']}) raised:")
                traceback.print_exc(file=sys.stdout)
                sys.stdout.flush()
                release_memory()
                raise StageFailed(f"harvest {name} raised {self._failed[name]}") from None
            seconds = time.perf_counter() - t0
            fell_back = compile_fell_back()
            say(f"  harvest {name:<12} ({p['device']}, {p['dtype']}, compile {p['compile']}): {summary.n_units:,} "
                f"units, {summary.n_tokens:,} tokens, {summary.n_contexts:,} contexts; loop {summary.seconds:.1f}s "
                f"({summary.tokens_per_second:,.0f} tok/s), whole call {seconds:.1f}s"
                f"{'; NOTE the compiled reducer fell back to eager' if fell_back else ''}")
            self.summary.data.setdefault("harvests", {})[name] = dict(
                units=summary.n_units, tokens=summary.n_tokens, loop_s=round(summary.seconds, 2),
                tok_s=round(summary.tokens_per_second), call_s=round(seconds, 2), compile_fell_back=fell_back)
            self._stores[name] = out
            release_memory()
        return self._stores[name]

    # - the speed models ------------------------------------------------------------------------------------

    def corpus(self) -> Path:
        if self._corpus is None:
            if not CORPUS_ASSET.is_file():
                raise StageFailed(f"{CORPUS_ASSET} is missing")
            self._corpus = CORPUS_ASSET  # .jsonl.gz: read as it is
        return self._corpus

    def speed_model(self) -> Path:
        if self._speed_model is None:
            self._speed_model = make_random_model(self.work / "smollm2-135m-random", self.sizes.speed_model,
                                                  self.dev, self.sizes.bench_dtype)
        return self._speed_model

    def big_model(self) -> Path:
        if self._big_model is None:
            self._big_model = make_random_model(self.work / "llama-1b-random", self.sizes.big_model, self.dev,
                                                self.sizes.bench_dtype)
        return self._big_model

    def sae16k(self) -> Path:
        if self._sae16k is None:
            s = self.sizes
            self._sae16k = make_sae(self.work / f"sae{s.sae_features}", d_in=s.speed_model["hidden_size"],
                                    d_sae=s.sae_features, k=s.sae_k, hook=f"blocks.{s.sae_layer}.hook_resid_post",
                                    dead=0, seed=2)
        return self._sae16k


def compile_fell_back() -> bool:
    """Whether the reducer's torch.compile failed in this process and harvest went on eagerly."""
    try:
        from featureatlas.harvest import reductions
        return any(getattr(call, "fell_back", False) for call in getattr(reductions, "_compiled", {}).values())
    except Exception:  # noqa: BLE001 - a probe only
        return False


def release_memory() -> None:
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


# -- making models, corpora and dictionaries ---------------------------------------------------------------------

def make_tiny(root: Path) -> dict:
    """A 4-layer random LLaMA with the tests' tiny BPE tokenizer, a corpus of 40 documents of varied length (so
    batches are padded), and a 96-feature top-k SAE in SAELens's format on blocks.2.hook_resid_post with 3 dead
    features (never above zero: their samples and statistics see only zeros)."""
    import torch
    import transformers
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.tiny_models import tiny_tokenizer  # noqa: I001 - the tests' own tokenizer, made offline

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=0, pad_token_id=1, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # as tests/tiny_models.py: random init is small; widen it so ties are rare
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    texts = [json.loads(line)["text"] for line in gzip.open(CORPUS_ASSET, "rt", encoding="utf-8")]
    play = "\n".join(texts[:3])
    docs, at = [], 5_000
    for i in range(40):
        n = 120 + (i * 997) % 3_500
        docs.append(play[at:at + n])
        at += n + 50
    docs[7] = "A short one."
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    sae = make_sae(root / "sae-res2", d_in=64, d_sae=96, k=8, hook="blocks.2.hook_resid_post", dead=3, seed=1)
    return {"model": root / "model", "corpus": corpus, "sae": sae}


def make_sae(folder: Path, d_in: int, d_sae: int, k: int, hook: str, dead: int, seed: int) -> Path:
    """A random top-k SAE written in SAELens 6.x's format (by the trainer's own writer; sae-lens is not needed).
    The last `dead` features never fire: a zero encoder column and a bias of -1."""
    import torch

    from featureatlas.harvest.train_sae import TrainResult, save_saelens_folder
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=1)
    w_enc, b_enc = w.T.clone(), torch.zeros(d_sae)
    if dead:
        w_enc[:, -dead:] = 0
        b_enc[-dead:] = -1.0
    result = TrainResult(W_enc=w_enc, b_enc=b_enc, W_dec=w, b_dec=torch.zeros(d_in), k=k, fvu=1.0, l0=float(k),
                         dead_fraction=dead / d_sae, steps=0, seconds=0.0)
    return save_saelens_folder(result, folder, hook_name=hook, model_name="random", context_size=64,
                               prepend_bos=True, dataset_path="random", overwrite=True)


def make_random_model(folder: Path, shape: dict, device: str, dtype: str) -> Path:
    """A LLaMA of the given config with random weights, saved with save_pretrained in `dtype`, with SmolLM2's
    tokenizer (from bench/device_assets). Initialised on the device: a 1B model's init on CPU takes long."""
    import tokenizers
    import torch
    import transformers

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer.from_str(gzip.decompress(TOKENIZER_ASSET.read_bytes()).decode("utf-8"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **SMOLLM2_SPECIAL)
    tokenizer.save_pretrained(folder)
    config = transformers.LlamaConfig(**shape)
    torch.manual_seed(0)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    except Exception as err:  # noqa: BLE001 - initialising on the device is only quicker
        say(f"  (initialising on {device} failed: {type(err).__name__}: {err}; initialising on CPU)")
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    release_memory()
    size = sum(p.stat().st_size for p in folder.iterdir())
    say(f"  made {folder.name}: {n_params / 1e6:,.0f}M parameters, {shape['num_hidden_layers']} layers x "
        f"{shape['intermediate_size']} neurons, {dtype}, {size / 1e6:,.0f} MB, in {time.perf_counter() - t0:.1f}s")
    return folder


# -- comparing two stores ---------------------------------------------------------------------------------------

def read_store(path: Path) -> dict:
    import duckdb
    con = duckdb.connect(str(path), read_only=True)
    try:
        q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
        examples: dict = defaultdict(list)
        for s, layer, unit, kind, lo, _rank, cid, pos, value in q(
                "SELECT source, layer, unit, example_kind, interval_lo, rank, context_id, max_position, "
                "max_activation FROM examples ORDER BY source, layer, unit, example_kind, interval_lo, rank"):
            examples[(s, layer, unit, kind)].append((lo, cid, pos, value))
        hist: dict = defaultdict(dict)
        for s, layer, unit, b, count in q("SELECT source, layer, unit, bin, count FROM histograms"):
            hist[(s, layer, unit)][b] = count
        logits: dict = defaultdict(list)
        for s, layer, unit, polarity, token in q("SELECT source, layer, unit, polarity, token_id FROM logit_effects "
                                                 "ORDER BY source, layer, unit, polarity, rank"):
            logits[(s, layer, unit, polarity)].append(token)
        return {
            "units": {(s, la, u): (mx, mn) for s, la, u, mx, mn in q(
                "SELECT source, layer, unit, max_activation, min_activation FROM units")},
            "stats": {(s, la, u): rest for s, la, u, *rest in q(
                "SELECT source, layer, unit, n_tokens, n_firing, mean, std, min_activation, max_activation "
                "FROM statistics")},
            "examples": examples, "hist": hist, "logits": logits,
            "contexts": dict(q("SELECT context_id, token_ids FROM contexts")),
            "run": q("SELECT n_tokens, n_contexts, dtype, device FROM runs")[0],
        }
    finally:
        con.close()


def compare_stores(a_path: Path, b_path: Path) -> dict:
    """How far store b is from store a (the reference): per example kind, the fraction of units whose lists
    (context ids and max positions, in rank order) are identical, and the largest rank-wise difference of the max
    activations relative to the unit's largest |activation|; the statistics' largest relative differences."""
    a, b = read_store(a_path), read_store(b_path)
    scale = {k: max(abs(v[0] or 0.0), abs(v[1] or 0.0)) or 1.0 for k, v in a["units"].items()}
    out: dict = {"units_a": len(a["units"]), "units_b": len(b["units"]), "run_a": a["run"], "run_b": b["run"]}
    units = sorted(a["units"])
    sources = sorted({k[0] for k in units})
    for kind in ("top", "bottom", "quantile", "random"):
        keys = [k for k in units if (*k, kind) in a["examples"] or (*k, kind) in b["examples"]]
        if not keys:
            continue
        same = same_set = 0
        worst = 0.0
        by_source: dict = defaultdict(lambda: [0, 0])
        for k in keys:
            ea, eb = a["examples"].get((*k, kind), []), b["examples"].get((*k, kind), [])
            ident = [(lo, c, p) for lo, c, p, _ in ea] == [(lo, c, p) for lo, c, p, _ in eb]
            same += ident
            same_set += {c for _, c, _, _ in ea} == {c for _, c, _, _ in eb}
            by_source[k[0]][0] += ident
            by_source[k[0]][1] += 1
            if kind in ("top", "bottom"):
                for (_, _, _, va), (_, _, _, vb) in zip(ea, eb, strict=False):
                    worst = max(worst, abs(va - vb) / scale[k])
                if len(ea) != len(eb):
                    worst = math.inf
        out[kind] = dict(units=len(keys), identical=same / len(keys), same_contexts=same_set / len(keys),
                         identical_by_source={s: round(v[0] / v[1], 5) for s, v in by_source.items()})
        if kind in ("top", "bottom"):
            out[kind]["max_value_rel_diff"] = worst
    stat_names = ("mean", "std", "min", "max")
    worst_stat = dict.fromkeys(stat_names, 0.0)
    n_tokens_bad = firing_bad = 0
    firing_worst = 0
    for k in units:
        sa, sb = a["stats"].get(k), b["stats"].get(k)
        if sa is None or sb is None:
            n_tokens_bad += 1
            continue
        n_tokens_bad += sa[0] != sb[0]
        firing_bad += sa[1] != sb[1]
        firing_worst = max(firing_worst, abs(sa[1] - sb[1]))
        for name, x, y in zip(stat_names, sa[2:], sb[2:], strict=True):
            if x is None or y is None:
                continue
            worst_stat[name] = max(worst_stat[name], abs(x - y) / scale[k])
    out["statistics"] = dict(n_tokens_mismatches=n_tokens_bad, n_firing_mismatches=firing_bad,
                             n_firing_max_diff=firing_worst, **{f"{n}_rel_diff": v for n, v in worst_stat.items()})
    out["histograms_identical"] = sum(a["hist"].get(k) == b["hist"].get(k) for k in units) / len(units)
    logit_keys = sorted(set(a["logits"]) | set(b["logits"]))
    out["logits_identical"] = (sum(a["logits"].get(k) == b["logits"].get(k) for k in logit_keys) / len(logit_keys)
                               if logit_keys else None)
    common = set(a["contexts"]) & set(b["contexts"])
    out["contexts_common"] = len(common)
    out["contexts_token_mismatches"] = sum(list(a["contexts"][c]) != list(b["contexts"][c]) for c in common)
    out["sources"] = sources
    return out


def judge(cmp: dict, min_identical: float = 0.99, value_rtol: float = 1e-4, stat_rtol: float = 1e-4) -> list[str]:
    """What is off in a comparison that should agree (float32 on two devices, or two runs on one)."""
    problems = []
    if cmp["units_a"] != cmp["units_b"]:
        problems.append(f"unit counts differ: {cmp['units_a']} vs {cmp['units_b']}")
    if cmp["run_a"][:2] != cmp["run_b"][:2]:
        problems.append(f"runs differ in tokens/contexts: {cmp['run_a'][:2]} vs {cmp['run_b'][:2]}")
    for kind in ("top", "bottom"):
        if kind in cmp:
            c = cmp[kind]
            if c["identical"] < min_identical:
                problems.append(f"{kind}: only {c['identical']:.4f} of units have identical lists "
                                f"(want >= {min_identical})")
            if not c["max_value_rel_diff"] <= value_rtol:
                problems.append(f"{kind}: max value differs by {c['max_value_rel_diff']:.3g} of the unit's scale "
                                f"(want <= {value_rtol})")
    st = cmp["statistics"]
    if st["n_tokens_mismatches"]:
        problems.append(f"statistics: n_tokens differs for {st['n_tokens_mismatches']} units")
    for name in ("mean", "std", "min", "max"):
        if not st[f"{name}_rel_diff"] <= stat_rtol:
            problems.append(f"statistics: {name} differs by {st[f'{name}_rel_diff']:.3g} of the unit's scale "
                            f"(want <= {stat_rtol})")
    if cmp["contexts_token_mismatches"]:
        problems.append(f"{cmp['contexts_token_mismatches']} contexts have other token ids")
    return problems


def show_comparison(label: str, cmp: dict) -> None:
    parts = []
    for kind in ("top", "bottom", "quantile", "random"):
        if kind in cmp:
            c = cmp[kind]
            extra = f", max value diff {c['max_value_rel_diff']:.2e}" if "max_value_rel_diff" in c else ""
            parts.append(f"{kind}: identical {c['identical']:.4f} (same contexts {c['same_contexts']:.4f}{extra}; "
                         f"by source {c['identical_by_source']})")
    st = cmp["statistics"]
    say(f"  {label}:")
    for p in parts:
        say(f"      {p}")
    say(f"      statistics: n_tokens mismatches {st['n_tokens_mismatches']}, n_firing mismatches "
        f"{st['n_firing_mismatches']} (max diff {st['n_firing_max_diff']}), rel diff mean {st['mean_rel_diff']:.2e} "
        f"std {st['std_rel_diff']:.2e} min {st['min_rel_diff']:.2e} max {st['max_rel_diff']:.2e}")
    say(f"      histograms identical {cmp['histograms_identical']:.4f}, logit effects identical "
        f"{cmp['logits_identical'] if cmp['logits_identical'] is None else round(cmp['logits_identical'], 4)}, "
        f"contexts in common {cmp['contexts_common']} (token mismatches {cmp['contexts_token_mismatches']})")


def brief(cmp: dict) -> dict:
    """The numbers of a comparison worth keeping in the JSON."""
    keep = {k: {x: v for x, v in cmp[k].items() if x != "identical_by_source"}
            for k in ("top", "bottom", "quantile", "random") if k in cmp}
    return {**keep, "statistics": cmp["statistics"], "histograms_identical": cmp["histograms_identical"],
            "logits_identical": cmp["logits_identical"], "contexts_token_mismatches": cmp["contexts_token_mismatches"]}


# -- stages ---------------------------------------------------------------------------------------------------------

def stage_env(ctx: Ctx, rec: dict) -> None:
    import numpy
    import torch
    import transformers

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "cuda_available": torch.cuda.is_available(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cc": shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"), "g++": shutil.which("g++")}
    for name in ("duckdb", "zstandard", "pyarrow", "jinja2", "safetensors", "tokenizers", "accelerate", "triton"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001
            info[name] = f"missing ({type(err).__name__})"
    import featureatlas.harvest.run
    info["featureatlas_harvest_from"] = str(Path(featureatlas.harvest.run.__file__).parent)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gb=round(p.total_memory / 2**30, 1),
                    bf16_supported=torch.cuda.is_bf16_supported(), gpus=torch.cuda.device_count())
    for k, v in info.items():
        say(f"  {k:<28} {v}")
    rec.update(info)
    if ctx.dev == "cuda" and not torch.cuda.is_available():
        raise StageFailed("--device cuda, but torch sees no CUDA device")
    if info["duckdb"].startswith("missing"):
        raise StageFailed("duckdb is not importable: device_check.sh installs it from .whl/")


def stage_primitives(ctx: Ctx, rec: dict) -> None:
    import torch
    dev = torch.device(ctx.dev)
    problems: list[str] = []
    # 1. single ops whose device kernels may differ from CPU's
    e = torch.tensor([2**20, 3, 2**20, 0])
    x = torch.tensor([0.0, 1.0, -2.0, 0.0])
    cpu_ldexp, dev_ldexp = torch.ldexp(x, e), torch.ldexp(x.to(dev), e.to(dev)).cpu()
    say(f"  ldexp([0, 1, -2, 0], [2^20, 3, 2^20, 0]): cpu {cpu_ldexp.tolist()}, {ctx.dev} {dev_ldexp.tolist()}")
    rec["ldexp_zero_by_2^20"] = {"cpu": cpu_ldexp[0].item(), ctx.dev: dev_ldexp[0].item()}
    if dev_ldexp[0].isnan():
        say("  NOTE: ldexp(0, 2^20) is NaN on the device (it multiplies by pow(2, e) = inf): Reservoir bins of a "
            "never-fired unit whose context max is 0 would be NaN")
    nan_long = {"cpu": torch.tensor([math.nan]).long().item(),
                ctx.dev: torch.tensor([math.nan], device=dev).long().item()}
    say(f"  NaN.long(): {nan_long}")
    rec["nan_to_long"] = nan_long
    g = torch.Generator().manual_seed(0)
    ties = torch.randint(0, 4, (257, 84), generator=g).float()
    a = ties.sort(dim=1, descending=True, stable=True).indices
    b = ties.to(dev).sort(dim=1, descending=True, stable=True).indices.cpu()
    small = torch.randint(0, 2, (257, 21), generator=g).to(torch.int8)
    c = small.argsort(dim=1, stable=True)
    d = small.to(dev).argsort(dim=1, stable=True).cpu()
    rec["stable_sort_equal"], rec["int8_argsort_equal"] = bool(torch.equal(a, b)), bool(torch.equal(c, d))
    say(f"  stable descending sort with ties equal to CPU: {rec['stable_sort_equal']}; int8 stable argsort: "
        f"{rec['int8_argsort_equal']}")
    if not (rec["stable_sort_equal"] and rec["int8_argsort_equal"]):
        problems.append("stable sorts differ from CPU")
    from featureatlas.harvest.statistics import histogram_columns
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 2.0**-16, 2.0**16, 3e38, -3e38, math.inf, -math.inf, 1.0, -1.5])
    values = torch.cat([special, torch.randn(10_000, generator=g) * 10.0 ** torch.randint(-6, 6, (10_000,),
                                                                                         generator=g)])
    for dtype in (torch.float32, torch.bfloat16):
        v = values.to(dtype)
        same = torch.equal(histogram_columns(v), histogram_columns(v.to(dev)).cpu())
        rec[f"histogram_columns_equal_{str(dtype)[6:]}"] = bool(same)
        if not same:
            problems.append(f"histogram_columns differ from CPU in {dtype}")
    say(f"  histogram_columns equal to CPU: float32 {rec['histogram_columns_equal_float32']}, bfloat16 "
        f"{rec['histogram_columns_equal_bfloat16']}")
    # 2. the reducer, eager and compiled, against CPU eager
    from featureatlas.harvest import reductions
    B, T, U, n_batches = ctx.sizes.prim_shape
    acts = torch.randn(B, T, U, generator=g) * 3
    counted = torch.ones(B, T, dtype=torch.bool)
    counted[:, 0] = False
    counted[-2:, T // 2:] = False  # two short contexts: padded
    for dtype in (torch.float32, torch.bfloat16):
        ref = reductions.reduce_eager(acts.to(dtype), counted, 1, True)
        for compiled in (False, True):
            t0 = time.perf_counter()
            got = reductions.reducer(compiled)(acts.to(dtype).to(dev), counted.to(dev), 1, True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            exact = all(torch.equal(r, q.cpu()) for r, q in zip(ref[:2], got[:2], strict=True))
            # a float sum's rounding grows with the sum of its terms' sizes, not with the (maybe tiny) result
            sizes = [(acts.to(dtype).float().abs() * counted[..., None]).sum((0, 1)).double(), ref[3].double()]
            sums = max(float(((r.double() - q.cpu().double()).abs() / (size + 1e-30)).max())
                       for r, q, size in zip(ref[2:4], got[2:4], sizes, strict=True))
            counts = torch.equal(ref[4].long(), got[4].cpu().long())
            tag = f"reducer_{'compiled' if compiled else 'eager'}_{str(dtype)[6:]}"
            rec[tag] = dict(extremes_equal=exact, sums_rel_diff=sums, firing_counts_equal=counts,
                            seconds=round(seconds, 2), fell_back=compile_fell_back() if compiled else None)
            fell = " (COMPILE FELL BACK TO EAGER)" if compiled and compile_fell_back() else ""
            say(f"  {tag}: context max/min equal to CPU eager {exact}, sums rel diff {sums:.2e}, firing counts "
                f"equal {counts}, first call {seconds:.1f}s{fell}")
            if not (exact and counts and sums <= 1e-5):
                problems.append(f"{tag} differs from CPU eager")
    if dev.type == "cuda" and compile_fell_back():
        problems.append("torch.compile of the reducer failed on CUDA (its one line is on stderr above) and harvest "
                        "fell back to eager: the compiled CUDA path is not checked")
    # 3. every accumulator fed identical activations on CPU and on the device
    for label, dtype, sparse, compiled in (("dense-f32-compiled", torch.float32, False, True),
                                           ("dense-f32-eager", torch.float32, False, False),
                                           ("dense-bf16-compiled", torch.bfloat16, False, True),
                                           ("sparse-f32", torch.float32, True, False),
                                           ("sparse-bf16", torch.bfloat16, True, False)):
        t0 = time.perf_counter()
        diffs = accumulators_cpu_vs_device(dev, dtype, sparse, compiled, ctx.sizes.prim_shape)
        bad = {k: v for k, v in diffs.items() if v is not True and not (isinstance(v, float) and v <= 1e-5)}
        rec[f"accumulators_{label}"] = {"equal": not bad, "differences": bad, "seconds": round(time.perf_counter() -
                                                                                              t0, 2)}
        say(f"  accumulators {label:<20}: {'all state equal to CPU' if not bad else 'DIFFER: ' + str(bad)} "
            f"({len(diffs)} tensors compared, {time.perf_counter() - t0:.1f}s)")
        if bad:
            problems.append(f"accumulators {label} differ from CPU: {sorted(bad)}")
    if problems:
        raise StageFailed("; ".join(problems))


def accumulators_cpu_vs_device(dev, dtype, sparse: bool, compiled: bool, shape: tuple) -> dict:
    """Feed the same synthetic batches to an Accumulators on CPU (eager) and on dev; compare their states in rank
    (and sample-key) order. True where equal; for float sums, the largest relative difference."""
    import torch

    from featureatlas.harvest.batchview import BatchView
    from featureatlas.harvest.contexts import Context, make_batch
    from featureatlas.harvest.harvester import Accumulators, Settings
    from featureatlas.harvest.hooks import Hook
    from featureatlas.harvest.sources import UnitSource

    B, T, U, n_batches = shape
    g = torch.Generator().manual_seed(7)
    source = UnitSource("sae:x" if sparse else "mlp", "sae" if sparse else "mlp",
                        Hook("blocks.0.hook_resid_post", 0, "layers.0", "output", "residual"), U,
                        signed=not sparse, sparse=sparse)
    accs = []
    for device, comp, fixed in ((torch.device("cpu"), False, False), (dev, compiled, True)):
        settings = Settings(top_k=5, bottom_k=5, intervals=4, per_interval=2, random=3, histogram_every=2, seed=3,
                            compile=comp, fixed_shapes=fixed)  # the harvest's CUDA form against the CPU one
        accs.append((Accumulators(source, settings, T, device, dtype), device))
    next_id = 0
    for step in range(n_batches):
        lengths = [T] * B
        if step == n_batches - 1:  # the last batch is padded, as a corpus's last contexts are
            lengths = [T if i % 3 else max(2, T // 3 + i % 5) for i in range(B)]
        contexts = [Context(next_id + i, 0, 0, [0] + [5] * (n - 1)) for i, n in enumerate(lengths)]
        next_id += B + 3  # ids increase, with gaps as a shard's would have
        batch = make_batch(contexts, True, 1)
        width = batch.input_ids.shape[1]
        x = torch.randn(B, width, U, generator=g) * 2
        x[:, :, : U // 8] = (x[:, :, : U // 8] * 2).round() / 2           # ties within and across contexts
        x[:, :, U // 8: U // 8 + 3] = 0.0                                 # units that are exactly zero everywhere
        x[:, :, U // 8 + 3: U // 8 + 6] = -x[:, :, U // 8 + 3: U // 8 + 6].abs() - 0.1  # never above zero
        if sparse:
            x = torch.where(x > 2.2, x, torch.zeros(()))                  # mostly zeros, some units dead
        x = x.to(dtype)
        for acc, device in accs:
            acc.update(x.to(device).contiguous(), BatchView.of(batch, 1, 3, device))
    (a, _), (b, _) = accs
    return compare_accumulators(a, b)


def compare_accumulators(a, b) -> dict:
    import torch

    def same(x, y) -> bool:
        x, y = x.detach().cpu(), y.detach().cpu()
        if x.shape != y.shape:
            return False
        if x.is_floating_point():
            return bool(((x == y) | (x.isnan() & y.isnan())).all())
        return bool(torch.equal(x, y))

    def rel(x, y) -> float:
        x, y = x.detach().cpu().double(), y.detach().cpu().double()
        return float(((x - y).abs() / (x.abs().max() + 1e-12)).max()) if x.numel() else 0.0

    out: dict = {}
    for name in ("top", "bottom"):
        pa, pb = getattr(a, name, None), getattr(b, name, None)
        if pa is None:
            continue
        for attr in ("values", "context_ids", "positions"):
            out[f"{name}.{attr}"] = same(getattr(pa, attr), getattr(pb, attr))
        out[f"{name}.activations"] = same(pa.activations(), pb.activations())
    for name in ("quantiles", "random"):
        pa, pb = getattr(a, name, None), getattr(b, name, None)
        if pa is None:
            continue
        out[f"{name}.exponent"] = same(pa.exponent, pb.exponent)
        oa, ob = pa.keys.cpu().argsort(dim=2, stable=True), pb.keys.cpu().argsort(dim=2, stable=True)
        for attr in ("keys", "context_ids", "positions", "values"):
            out[f"{name}.{attr}"] = same(getattr(pa, attr).cpu().gather(2, oa), getattr(pb, attr).cpu().gather(2, ob))
        acts_a, acts_b = pa.activations.cpu(), pb.activations.cpu()
        out[f"{name}.activations"] = same(acts_a.gather(2, oa[..., None].expand_as(acts_a)),
                                          acts_b.gather(2, ob[..., None].expand_as(acts_b)))
    sa, sb = a.statistics.finish(), b.statistics.finish()
    out["statistics.n_tokens"] = a.statistics.n_tokens == b.statistics.n_tokens
    for key in sa:
        out[f"statistics.{key}"] = rel(sa[key], sb[key]) if key in ("sum_activation", "sum_squares") \
            else same(sa[key], sb[key])
    return out


def stage_correctness(ctx: Ctx, rec: dict) -> None:
    tiny = ctx.tiny()
    say(f"  tiny model {tiny['model']}, corpus {tiny['corpus']}, SAE {tiny['sae']}")
    names = ["cpu-f32", "dev-f32", "dev-f32-nographs", "dev-f32-off", "dev-f32-on", "dev-bf16"]
    problems = []
    for name in names:
        try:
            ctx.store(name)
        except StageFailed as err:
            problems.append(str(err))
    checks = [("cpu-f32", "dev-f32", "CPU float32 vs device float32 (compile auto)", True),
              ("dev-f32", "dev-f32-nographs", "device float32: CUDA graphs vs none", True),
              ("dev-f32", "dev-f32-off", "device float32: compile auto vs off", True),
              ("dev-f32", "dev-f32-on", "device float32: compile auto vs on", True),
              ("cpu-f32", "dev-bf16", "CPU float32 vs device bfloat16 (report only)", False)]
    for a, b, label, strict in checks:
        if a in ctx._failed or b in ctx._failed:
            continue
        cmp = compare_stores(ctx.store(a), ctx.store(b))
        show_comparison(label, cmp)
        rec.setdefault("comparisons", {})[f"{a} vs {b}"] = brief(cmp)
        if strict:
            off = judge(cmp)
            if off:
                say(f"  !! {label}: " + "; ".join(off))
                problems += [f"{a} vs {b}: {p}" for p in off]
    rec["compile_fell_back"] = compile_fell_back()
    try:
        import torch
        if torch.cuda.is_available():
            rec["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    except Exception:  # noqa: BLE001
        pass
    if problems:
        raise StageFailed("; ".join(problems))


def stage_verify(ctx: Ctx, rec: dict) -> None:
    from featureatlas.harvest.verify import VerifyConfig, verify
    problems = []
    try:
        store = ctx.store("dev-f32")
        rc, output = run_streamed([sys.executable, "-m", "featureatlas", "verify", str(store), "--sample", "300",
                                   "--device", ctx.dev, "--json"], timeout=min(90, ctx.left()), env=child_env())
        rec["cli_dev_f32"] = _verify_numbers(_json_in(output), rc)
        say(f"  featureatlas verify (CLI) of the {ctx.dev} float32 store: exit {rc}, {rec['cli_dev_f32']}")
        if rc != 0:
            problems.append(f"verify (CLI) of the {ctx.dev} float32 store: exit {rc}")
    except StageFailed as err:
        problems.append(str(err))
    runs = [("dev-bf16", ctx.dev, True)]
    if ctx.dev != "cpu":
        runs.append(("dev-f32", "cpu", False))  # the device's store recomputed on CPU: do their float32 agree?
    for name, device, strict in runs:
        t0 = time.perf_counter()
        try:
            r = verify(VerifyConfig(store=ctx.store(name), sample=300, device=device, progress=False))
        except StageFailed as err:
            problems.append(str(err))
            continue
        except Exception as err:  # noqa: BLE001 - the next one may still run
            say(f"!! verify {name} on {device} raised:")
            traceback.print_exc(file=sys.stdout)
            problems.append(f"verify {name} on {device}: {type(err).__name__}: {err}"[:500])
            continue
        numbers = dict(ok=r.ok, n_examples=r.n_examples, n_exact=r.n_exact, max_relative_diff=r.max_relative_diff,
                       mismatches=len(r.mismatches), rtol=r.rtol, seconds=round(time.perf_counter() - t0, 1),
                       report_only=not strict)
        rec[f"{name}_on_{device}"] = numbers
        say(f"  verify {name} store on {device}{'' if strict else ' (report only)'}: {r.summary()}; {numbers}")
        if not r.ok:
            say("    " + r.table().replace("\n", "\n    "))
            if strict:
                problems.append(f"verify of {name} on {device}: {len(r.mismatches)} mismatches")
        release_memory()
    if problems:
        raise StageFailed("; ".join(problems))


def _json_in(output: str) -> dict | None:
    start = output.find("{")
    if start < 0:
        return None
    try:
        return json.loads(output[start:output.rfind("}") + 1])
    except ValueError:
        return None


def _verify_numbers(report: dict | None, rc: int | None) -> dict:
    if report is None:
        return {"exit": rc, "report": None}
    return {"exit": rc, "ok": report.get("ok"), "n_examples": report.get("n_examples"),
            "n_exact": report.get("n_exact"), "max_relative_diff": report.get("max_relative_diff"),
            "mismatches": len(report.get("mismatches", [])),
            "first_mismatches": [m.get("where") for m in report.get("mismatches", [])[:5]]}


def harvest_argv(p: dict, out: Path) -> list[str]:
    return ["harvest", "--model", p["model"], "--corpus", p["corpus"], "--out", str(out), "--tokens", str(p["tokens"]),
            "--context-length", str(p["context_length"]), "--top-k", str(p["top_k"]), "--layers", p["layers"],
            "--resid", p["resid"], *(a for s in p["saes"] for a in ("--sae", s)), "--batch-size",
            str(p["batch_size"]), "--device", p["device"], "--dtype", p["dtype"], "--compile", p["compile"],
            "--overwrite"]


def stage_torchrun(ctx: Ctx, rec: dict) -> None:
    problems = []
    runs = [("nproc1", 1, "dev-f32", "8"),       # WORLD_SIZE 1: launched_by_torchrun() is False, a plain harvest
            ("nproc2-gloo-cpu", 2, "cpu-f32-off", "4")]  # gloo (distributed.py picks nccl only for CUDA)
    for label, nproc, reference, threads in runs:
        out = ctx.work / "stores" / f"torchrun-{label}.duckdb"
        p = ctx.harvest_params(reference)
        try:
            ref_store = ctx.store(reference)
        except StageFailed as err:
            problems.append(f"torchrun {label}: no reference store: {err}")
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "featureatlas", *harvest_argv(p, out)]
        t0 = time.perf_counter()
        rc, output = run_streamed(cmd, timeout=min(75, ctx.left()), env=child_env(OMP_NUM_THREADS=threads))
        seconds = time.perf_counter() - t0
        rec[label] = {"exit": rc, "seconds": round(seconds, 1), "harvested_lines": output.count("harvested ")}
        if rc != 0 or not out.exists():
            problems.append(f"torchrun {label}: exit {rc}")
            continue
        leftovers = sorted(x.name for x in out.parent.glob(f".{out.name}.shard-*"))
        if leftovers:
            problems.append(f"torchrun {label}: shard stores left behind: {leftovers}")
        cmp = compare_stores(ref_store, out)
        show_comparison(f"torchrun {label} ({p['device']}) vs single-process {reference}", cmp)
        rec[label]["comparison"] = brief(cmp)
        off = judge(cmp, min_identical=1.0, value_rtol=1e-6, stat_rtol=1e-5)
        if off:
            say(f"  !! torchrun {label}: " + "; ".join(off))
            problems += [f"torchrun {label}: {x}" for x in off]
    say("  note: with one GPU, nccl cannot be exercised: --nproc-per-node 1 sets WORLD_SIZE=1, which harvest runs as a "
        "plain single process, and two ranks on one GPU need LOCAL_RANK 1 (torch.cuda.set_device(1) fails)")
    if problems:
        raise StageFailed("; ".join(problems))


BENCH_LINE = re.compile(r"^\s*(all batches|last \d+): bare forward\s+(\d+) tok/s \| harvest\s+(\d+) tok/s \| "
                        r"ratio harvest/bare ([\d.]+)", re.M)


def run_bench(ctx: Ctx, rec: dict, model: Path, extra: list[str], batches: int, batch: int | None = None) -> None:
    s = ctx.sizes
    cmd = [sys.executable, str(REPO / "bench" / "harvest.py"), "--model", str(model), "--corpus", str(ctx.corpus()),
           "--device", ctx.dev, "--dtype", s.bench_dtype, "--batch-size", str(batch or s.bench_batch), "--batches",
           str(batches), "--compile", s.bench_compile, *extra]
    t0 = time.perf_counter()
    rc, output = run_streamed(cmd, timeout=min(ctx.stage_budget, ctx.left()), env=child_env())
    rec.update(exit=rc, seconds=round(time.perf_counter() - t0, 1))
    for label, bare, harvest, ratio in BENCH_LINE.findall(output):
        rec[label] = dict(bare_tok_s=int(bare), harvest_tok_s=int(harvest), ratio=float(ratio))
    head = next((line for line in output.splitlines() if " batches of " in line), None)
    rec["what"] = head
    if rc != 0:
        raise StageFailed(f"bench/harvest.py exit {rc}")


def stage_bench_neurons(ctx: Ctx, rec: dict) -> None:
    run_bench(ctx, rec, ctx.speed_model(), [], ctx.sizes.bench_batches)


def stage_bench_wide(ctx: Ctx, rec: dict) -> None:
    """bench-neurons with 4 times the contexts a batch: what launching small kernels costs against a longer forward."""
    run_bench(ctx, rec, ctx.speed_model(), [], max(ctx.sizes.bench_batches // 2, 2), batch=4 * ctx.sizes.bench_batch)


def stage_profile(ctx: Ctx, rec: dict) -> None:
    """bench-neurons' model, 12 batches without CUDA graphs, then the last 3 profiled: which kernels the updates
    spend their GPU time in."""
    run_bench(ctx, rec, ctx.speed_model(), ["--cuda-graphs", "off", "--profile", "3"], 12)


def stage_bench_resid(ctx: Ctx, rec: dict) -> None:
    run_bench(ctx, rec, ctx.speed_model(), ["--resid"], ctx.sizes.bench_batches)


def stage_bench_1b(ctx: Ctx, rec: dict) -> None:
    model = ctx.big_model()
    try:
        run_bench(ctx, rec, model, [], ctx.sizes.big_batches)
    finally:
        shutil.rmtree(model, ignore_errors=True)
        ctx._big_model = None


def stage_bench_sae(ctx: Ctx, rec: dict) -> None:
    run_bench(ctx, rec, ctx.speed_model(), ["--layers", "none", "--sae", str(ctx.sae16k())], ctx.sizes.bench_batches)


def stage_bench_whole(ctx: Ctx, rec: dict) -> None:
    s = ctx.sizes
    t1, t2, memory, factor = ctx.args.whole or s.whole
    cmd = [sys.executable, str(REPO / "bench" / "harvest_whole.py"), "--model", str(ctx.speed_model()), "--corpus",
           str(ctx.corpus()), "--device", ctx.dev, "--dtype", s.bench_dtype, "--batch-size", str(s.bench_batch),
           "--t1", str(t1), "--t2", str(t2), "--memory-tokens", str(memory), "--memory-factor", str(factor),
           "--compile", s.bench_compile, "--repeats", "1"]
    t0 = time.perf_counter()
    rc, output = run_spawned(cmd, timeout=min(ctx.stage_budget, ctx.left()), env=child_env(),
                             log=ctx.work / "harvest_whole.log")
    rec.update(exit=rc, seconds=round(time.perf_counter() - t0, 1))
    m = re.search(r"^ratio\s+([\d.]+)", output, re.M)
    rec["ratio"] = float(m.group(1)) if m else None
    rec["runs"] = re.findall(r"^\s+\[(?:\d+/\d+|memory)\] .*$", output, re.M)
    seconds = {(kind, int(tokens.replace(",", ""))): float(s) for kind, tokens, s in re.findall(
        r"^\s+\[\d+/\d+\] (bare|harvest)\s+([\d,]+) tokens:\s+([\d.]+) s", output, re.M)}
    if rec["ratio"] is None and len(seconds) == 4:  # cut before its table: the ratio from the four run times
        rates = {k: (t2 - t1) / (seconds[k, t2] - seconds[k, t1]) for k in ("bare", "harvest")
                 if seconds.get((k, t2), 0) > seconds.get((k, t1), 0)}
        if len(rates) == 2:
            rec["ratio"] = round(rates["harvest"] / rates["bare"], 3)
            say(f"  ratio from the run times: {rec['ratio']} (marginal harvest {rates['harvest']:,.0f} tok/s / "
                f"bare {rates['bare']:,.0f} tok/s)")
    rec["table"] = [line for line in output.splitlines() if line.startswith("| ")][-1:]
    m = re.search(r"^memory\s+(.*)$", output, re.M)
    rec["memory"] = m.group(1) if m else None
    if rc != 0:
        raise StageFailed(f"bench/harvest_whole.py exit {rc}")


STAGE_FUNCTIONS: dict[str, Callable[[Ctx, dict], None]] = {
    "env": stage_env, "primitives": stage_primitives, "correctness": stage_correctness, "verify": stage_verify,
    "torchrun": stage_torchrun, "bench-neurons": stage_bench_neurons, "bench-wide": stage_bench_wide,
    "profile": stage_profile, "bench-resid": stage_bench_resid,
    "bench-1b": stage_bench_1b, "bench-sae": stage_bench_sae, "bench-whole": stage_bench_whole}


# -- main -----------------------------------------------------------------------------------------------------------

def selected(args: argparse.Namespace) -> list[str]:
    def expand(spec: str | None) -> set[str]:
        names: set[str] = set()
        for part in (spec or "").split(","):
            part = part.strip()
            if not part:
                continue
            hits = {n for n, group, *_ in STAGES if part in (n, group) or (part == "bench" and group == "speed")}
            if not hits:
                raise SystemExit(f"--only/--skip: unknown stage {part!r}; stages: "
                                 f"{', '.join(n for n, *_ in STAGES)}; groups: checks, speed")
            names |= hits
        return names

    only, skip = expand(args.only), expand(args.skip)
    return [n for n, *_ in STAGES if (not only or n in only or n == "env") and n not in skip]


def _whole(text: str) -> tuple[int, int, int, int]:
    try:
        t1, t2, memory, factor = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want T1,T2,MEMORY,FACTOR, e.g. 200000,600000,100000,10") from None
    return t1, t2, memory, factor


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--small", action="store_true", help="small sizes (for a CPU run here)")
    ap.add_argument("--only", default=None, help="comma-separated stages or groups (checks, speed) to run")
    ap.add_argument("--skip", default=None, help="comma-separated stages or groups to leave out")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/device_check_out"),
                    help="where device_check.json goes (default: $OUT, else /tmp/device_check_out)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all stages (default: 380, 240 with --small); a stage that would start with "
                         "less than it needs is skipped, a subprocess past it is stopped")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (models, stores)")
    ap.add_argument("--whole", type=_whole, default=None, metavar="T1,T2,MEMORY,FACTOR",
                    help="bench/harvest_whole.py's --t1, --t2, --memory-tokens, --memory-factor (default: "
                         "200000,600000,100000,10; with --small 1000,3000,1000,2)")
    args = ap.parse_args()
    start_spawner()  # before anything heavy is imported (see _SPAWNER_CODE)
    args.budget = args.budget or (240.0 if args.small else 380.0)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of every in-process load
    except Exception:  # noqa: BLE001 - only cosmetic
        pass
    names = selected(args)
    started = time.monotonic()
    deadline = started + args.budget
    work = args.work or Path(tempfile.mkdtemp(prefix="featureatlas-device-check-"))
    work.mkdir(parents=True, exist_ok=True)
    summary = Summary(args.out / "device_check.json", args)
    ctx = Ctx(args, work, summary, deadline)
    current = {"stage": None}

    def watchdog() -> None:
        say(f"\n!! hard deadline ({args.budget:.0f}s + {GRACE}s) reached during {current['stage']}; stopping")
        if _child is not None:
            _kill_group(_child)
        if _child_pid is not None:
            _kill_pid_group(_child_pid)
        if current["stage"]:
            summary.stage(current["stage"]).update(status="timeout")
        summary.write()
        sys.stdout.flush()
        os._exit(3)

    timer = threading.Timer(args.budget + GRACE, watchdog)
    timer.daemon = True
    timer.start()
    say(f"device_check: device {args.device}{' (small sizes)' if args.small else ''}, stages {', '.join(names)}, "
        f"budget {args.budget:.0f}s, scratch {work}, summary {summary.path}")
    limits = {n: (budget, need) for n, _, budget, need in STAGES}
    for name in names:
        rec = summary.stage(name)
        left = ctx.left()
        if left < limits[name][1]:
            header(f"{name}: skipped ({left:.0f}s left of the budget, it needs {limits[name][1]}s)")
            rec.update(status="skipped", reason=f"{left:.0f}s left of the budget")
            summary.write()
            continue
        header(f"{name}  ({time.monotonic() - started:.0f}s in, {left:.0f}s left)")
        current["stage"] = name
        ctx.stage_budget = limits[name][0]
        t0 = time.perf_counter()
        try:
            STAGE_FUNCTIONS[name](ctx, rec)
            rec["status"] = "ok"
        except StageFailed as err:
            rec.update(status="failed", error=str(err))
            say(f"!! {name} FAILED: {err}")
        except BaseException as err:  # noqa: BLE001 - report and go on, whatever it was
            if isinstance(err, KeyboardInterrupt):
                raise
            rec.update(status="failed", error=f"{type(err).__name__}: {err}"[:2000])
            say(f"!! {name} FAILED with {type(err).__name__}:")
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        current["stage"] = None
        say(f"-- {name}: {rec['status']} in {rec['seconds']:.1f}s")
        summary.write()
        release_memory()
        if name == "env" and rec["status"] != "ok" and args.device == "cuda":
            for later in names[names.index(name) + 1:]:
                summary.stage(later).update(status="skipped", reason="env failed with --device cuda")
            say("!! env failed with --device cuda (no GPU, or duckdb missing): the other stages are skipped")
            break
    timer.cancel()
    summary.data["total_s"] = round(time.monotonic() - started, 1)
    summary.write()
    header("summary")
    for name, rec in summary.data["stages"].items():
        say(f"  {name:<14} {rec.get('status', '?'):<8} {rec.get('seconds', 0):>6}s  {rec.get('error', '')[:300]}")
    say(f"  total {summary.data['total_s']}s; {'ALL PASSED' if summary.data['ok'] else 'SOME STAGES FAILED'}; "
        f"summary in {summary.path}")
    if _spawner is not None and _spawner.stdin is not None:
        _spawner.stdin.close()  # it exits at the end of its input
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
