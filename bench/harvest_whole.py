"""Whole-process harvest cost: `featureatlas harvest` against a bare forward of the same tokens, each its own process.

    python bench/harvest_whole.py [--model smollm2-135m] [--corpus C] [--t1 20000] [--t2 60000]
                                  [--memory-tokens 10000] [--memory-factor 10] [--batch-size 64]
                                  [--dtype auto|float32,bfloat16] [--layers all] [--resid] [--sae DIR]
                                  [--compile on] [--repeats 1]

Child processes, each started with subprocess and timed from outside (interpreter start to exit):
- bare, at T1 and T2 tokens: bench/harvest_whole_child.py loads the model as the harvest does, tokenises the corpus
  into the same contexts and batches, and runs only the backbone forward (plus each --sae dictionary's encode);
- harvest, at T1 and T2: the `featureatlas harvest` command (tokenising, batching, harvesting, writing the store,
  everything) with the same model, dtype, device, batch size and context length, into a temporary store (run by
  bench/harvest_whole_child.py through featureatlas.cli.main, the console script's own entry point, so that it can
  add the CUDA peak);
- harvest at --memory-tokens and --memory-factor times as many, for peak memory only.
The ratio is the harvest's marginal rate, (T2 - T1) / (its seconds at T2 - at T1), over the bare one's: what is
paid once per process (imports, model load, compiling, writing a store of a fixed number of units) cancels, and is
printed apart as each side's intercept. The target is a ratio of 0.9 or more. With compiling on, one untimed small
harvest runs first, so that every timed one finds the compile cache warm. Repeats (--repeats) run the four
ratio processes in turn again and keep each one's fastest time, which a noisy machine needs.

Peak RSS is each child's ru_maxrss as os.wait4 returns it for that child alone (its own peak, or a descendant's
such as a compile worker's if larger). A child starts from the bench's own peak RSS (Linux carries the high-water
mark across exec), so the bench imports nothing heavy; that floor is printed. On CUDA each child also reports
torch.cuda.max_memory_allocated, read in the process itself when the work is done. The target is a peak at 10x
the tokens within 10% of the peak at 1x.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from featureatlas.harvest.config import HarvestConfig

DEFAULTS = HarvestConfig(model="", corpus="", out="")  # the harvest's own defaults

CHILD = Path(__file__).with_name("harvest_whole_child.py")


@dataclass
class Run:
    kind: str
    tokens: int
    seconds: float
    max_rss: int            # bytes
    report: dict = field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default=None, help="default: the embedded Shakespeare corpus")
    ap.add_argument("--t1", type=int, default=20_000, help="tokens of the shorter runs (default: %(default)s)")
    ap.add_argument("--t2", type=int, default=60_000, help="tokens of the longer runs (default: %(default)s)")
    ap.add_argument("--memory-tokens", type=int, default=10_000,
                    help="tokens of the 1x memory run (default: %(default)s; 0: no memory runs)")
    ap.add_argument("--memory-factor", type=int, default=10, help="the other memory run's multiple (default: 10)")
    ap.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    ap.add_argument("--context-length", type=int, default=DEFAULTS.context_length)
    ap.add_argument("--top-k", type=int, default=DEFAULTS.top_k)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", default="auto", type=_dtypes,
                    help="auto, float32, bfloat16 or float16, or several comma-separated (e.g. float32,bfloat16): "
                         "each benched in turn, their rows printed side by side at the end")
    ap.add_argument("--layers", default=None, help="MLP neurons of these layers (default: all; none: no neurons)")
    ap.add_argument("--resid", action="store_true", help="also every layer's residual dimensions")
    ap.add_argument("--sae", action="append", default=[], help="a dictionary folder (repeatable)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="on",
                    help="the harvest's --compile (default: on, as a long run gets it; its one-off cost cancels)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each ratio process; the fastest counts")
    ap.add_argument("--keep-logs", type=Path, default=None, help="copy every child's stdout and stderr here")
    args = ap.parse_args()
    if not 0 < args.t1 < args.t2:
        raise SystemExit("want 0 < --t1 < --t2")
    corpus = args.corpus or _embedded_corpus()
    rows = []
    for dtype in args.dtype:
        rows.append(_bench(argparse.Namespace(**{**vars(args), "dtype": dtype}), corpus))
    if len(rows) > 1:
        print(f"\nside by side (load average now {os.getloadavg()[0]:.1f})")
        print(TABLE_HEAD.format(factor=args.memory_factor))
        print("\n".join(rows))


TABLE_HEAD = "| machine | dtype | units | bare marginal | harvest marginal | ratio | RSS 1x | RSS {factor}x |"


def _dtypes(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in ("auto", "float32", "bfloat16", "float16")]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{value!r}: auto, float32, bfloat16 or float16, comma-separated")
    return names


def _bench(args: argparse.Namespace, corpus: str) -> str:
    """One dtype's four timed processes (and memory runs); prints its report and returns its table row."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="featureatlas-bench-") as tmp:
        workdir = Path(tmp)

        def bare(tokens: int) -> Run:
            cmd = ["--model", args.model, "--corpus", str(corpus), "--tokens", str(tokens),
                   "--batch-size", str(args.batch_size), "--context-length", str(args.context_length),
                   "--device", args.device, "--dtype", args.dtype, *(a for s in args.sae for a in ("--sae", s))]
            return _run_child("bare", tokens, cmd, workdir, args.keep_logs)

        def harvest(tokens: int) -> Run:
            cmd = ["--model", args.model, "--corpus", str(corpus), "--out", str(workdir / "store.duckdb"),
                   "--tokens", str(tokens), "--batch-size", str(args.batch_size),
                   "--context-length", str(args.context_length), "--top-k", str(args.top_k),
                   "--device", args.device, "--dtype", args.dtype, "--compile", args.compile, "--overwrite",
                   *(["--layers", args.layers] if args.layers is not None else []),
                   *(["--resid"] if args.resid else []), *(a for s in args.sae for a in ("--sae", s))]
            try:
                return _run_child("harvest", tokens, cmd, workdir, args.keep_logs)
            finally:
                for leftover in workdir.glob("store.duckdb*"):
                    leftover.unlink()

        print(f"featureatlas harvest {_shown(harvest_args_example(args, corpus))}", flush=True)
        # One untimed harvest first, so that every timed one finds Inductor's on-disk cache warm (a cold one cost
        # 25 s more on an H200, which the marginal rate would have counted).
        if args.compile != "off":
            warm = harvest(min(args.t1, 3 * args.batch_size * args.context_length))
            print(f"  [warm-up] harvest {warm.tokens:>9,} tokens: {warm.seconds:7.1f} s (untimed: fills the compile "
                  "cache)", flush=True)
        runs: dict[tuple[str, int], Run] = {}
        for repeat in range(args.repeats):
            for kind, tokens in (("bare", args.t1), ("harvest", args.t1), ("bare", args.t2), ("harvest", args.t2)):
                run = (bare if kind == "bare" else harvest)(tokens)
                print(f"  [{repeat + 1}/{args.repeats}] {kind:7} {tokens:>9,} tokens: {run.seconds:7.1f} s, "
                      f"peak RSS {_mb(run.max_rss)}", flush=True)
                best = runs.get((kind, tokens))
                if best is None or run.seconds < best.seconds:
                    runs[kind, tokens] = run
        memory: list[Run] = []
        if args.memory_tokens > 0:
            for tokens in (args.memory_tokens, args.memory_tokens * args.memory_factor):
                memory.append(harvest(tokens))
                print(f"  [memory] harvest {tokens:>9,} tokens: {memory[-1].seconds:7.1f} s, "
                      f"peak RSS {_mb(memory[-1].max_rss)}", flush=True)
    return _print_results(args, corpus, runs, memory, load_before, os.getloadavg())


def harvest_args_example(args: argparse.Namespace, corpus: str) -> list[str]:
    """The harvest command line, for the record (T and the temporary --out stand in)."""
    return ["--model", args.model, "--corpus", str(corpus), "--out", "TMP/store.duckdb", "--tokens", "T",
            "--batch-size", str(args.batch_size), "--context-length", str(args.context_length),
            "--top-k", str(args.top_k), "--device", args.device, "--dtype", args.dtype, "--compile", args.compile,
            "--overwrite", *(["--layers", args.layers] if args.layers is not None else []),
            *(["--resid"] if args.resid else []), *(a for s in args.sae for a in ("--sae", s))]


def _run_child(kind: str, tokens: int, argv: list[str], workdir: Path, keep_logs: Path | None) -> Run:
    report = workdir / "report.json"
    report.unlink(missing_ok=True)
    out_path, err_path = workdir / f"{kind}-{tokens}.out", workdir / f"{kind}-{tokens}.err"
    cmd = [sys.executable, str(CHILD), kind, "--report", str(report), "--", *argv]
    with out_path.open("w") as out, err_path.open("w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone, not the max over all children
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if keep_logs is not None:
        keep_logs.mkdir(parents=True, exist_ok=True)
        for path in (out_path, err_path):
            shutil.copy(path, keep_logs / f"{path.stem}-{int(time.time())}{path.suffix}")
    if proc.returncode != 0:
        tail = "\n".join(err_path.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{kind} at {tokens:,} tokens failed (exit {proc.returncode}):\n  {_shown(cmd)}\n{tail}")
    return Run(kind, tokens, seconds, usage.ru_maxrss * 1024, json.loads(report.read_text()),
               out_path.read_text(errors="replace"), err_path.read_text(errors="replace"))


def _print_results(args: argparse.Namespace, corpus: str, runs: dict[tuple[str, int], Run], memory: list[Run],
                   load_before: tuple[float, ...], load_after: tuple[float, ...]) -> str:
    t1, t2 = args.t1, args.t2
    b1, b2, h1, h2 = runs["bare", t1], runs["bare", t2], runs["harvest", t1], runs["harvest", t2]
    device = b2.report.get("cuda_device") or "cpu"
    cli = _parse_cli_line(h2.stdout)
    units = f"{cli['units']:,} units" if cli else "? units"
    parts = ["neurons of all layers" if args.layers in (None, "all") else
             "" if args.layers == "none" else f"neurons of layers {args.layers}",
             "residual dims of all layers" if args.resid else "", *(f"SAE {s}" for s in args.sae)]
    what = ", ".join(p for p in parts if p)
    print()
    print(f"machine   {_cpu_model()}, {os.cpu_count()} cores, AVX-512 BF16 {'yes' if _avx512_bf16() else 'no'}"
          f"{'; GPU ' + device if device != 'cpu' else ''}")
    print(f"load      {load_before[0]:.1f} (1-min average) at start, {load_after[0]:.1f} at end")
    print(f"run       {args.model} on {b2.report.get('device', '?')}, {b2.report.get('dtype', '?')}; {units} "
          f"({what}); batch {args.batch_size} x {args.context_length} tokens, top-{args.top_k}, "
          f"compile {args.compile}; corpus {'embedded' if args.corpus is None else corpus}; "
          f"fastest of {args.repeats}")
    print()
    rate: dict[str, float | None] = {}
    print(f"{'whole process':<14}{'T1=' + format(t1, ','):>14}{'T2=' + format(t2, ','):>14}"
          f"{'marginal':>16}{'fixed cost':>12}{'in-loop rate at T1 / T2':>28}")
    for label, r1, r2 in (("bare forward", b1, b2), ("harvest", h1, h2)):
        rate[label] = (t2 - t1) / (r2.seconds - r1.seconds) if r2.seconds > r1.seconds else None
        marginal = f"{rate[label]:,.0f} tok/s" if rate[label] else "n/a"
        fixed = f"{r1.seconds - t1 / rate[label]:.1f} s" if rate[label] else "n/a"
        loops = " / ".join(f"{x:,.0f}" if x else "?" for x in (_loop_rate(r1), _loop_rate(r2))) + " tok/s"
        print(f"{label:<14}{r1.seconds:>12.1f} s{r2.seconds:>12.1f} s{marginal:>16}{fixed:>12}{loops:>28}")
    bare_rate, harvest_rate = rate["bare forward"], rate["harvest"]
    if bare_rate and harvest_rate:
        print(f"ratio     {harvest_rate / bare_rate:.3f} (marginal harvest / marginal bare; target >= 0.9)")
    else:
        noisy = " and ".join(k for k, v in rate.items() if not v)
        bound = (f"; at most {harvest_rate / (t2 / b2.seconds):.3f}, counting all of bare's {b2.seconds:.1f} s "
                 f"at T2 as marginal" if harvest_rate and not bare_rate else "")
        print(f"ratio     n/a: {noisy} at T2 took no longer than at T1, the machine's noise exceeds the "
              f"difference (raise --t2 or --repeats){bound}")
    print(f"          whole processes at T2: bare / harvest seconds {b2.seconds / h2.seconds:.3f}; in-loop rates: bare "
          f"as its child times its loop (model load {b2.report['load_seconds']:.1f} s apart), harvest as the command "
          f"prints it")
    for run in (h1, h2):
        bars = _progress_seconds(run.stderr)
        if bars:
            print(f"          harvest at {run.tokens:,}: {run.seconds:.1f} s = loop {bars.get('harvest', 0)} s "
                  f"+ store {bars.get('store', 0)} s + the rest (imports, model load, closing) "
                  f"{run.seconds - sum(bars.values()):.0f} s (its progress bars' whole seconds)")
    n1, n2 = b1.report.get("n_batches", 0), b2.report.get("n_batches", 0)
    if n2 < 32:
        print(f"          note: {n1} and {n2} batches; early batches, while every unit's lists and samples fill, cost "
              f"more than later ones (bench/harvest.py's second half), so this marginal is below a long run's")
    print()
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak memory (ru_maxrss per child from os.wait4; floor inherited from this bench: {_mb(floor)})")
    rows = [("bare forward", b1, b2), ("harvest", h1, h2)]
    if memory:
        rows.append(("harvest (memory)", memory[0], memory[1]))
    print(f"{'':<18}{'tokens':>22}{'RSS':>22}{'RSS ratio':>11}{'CUDA max allocated':>30}")
    for label, small, large in rows:
        cuda = ""
        if "cuda_max_allocated" in small.report:
            a, b = small.report["cuda_max_allocated"], large.report["cuda_max_allocated"]
            cuda = f"{_mb(a)} / {_mb(b)} ({b / a:.3f})"
        print(f"{label:<18}{small.tokens:>10,} / {large.tokens:<9,}{_mb(small.max_rss):>11} / {_mb(large.max_rss):<9}"
              f"{large.max_rss / small.max_rss:>10.3f} {cuda:>30}")
    if memory:
        small, large = memory
        cuda = "; CUDA: not on this machine"
        if "cuda_max_allocated" in small.report:
            growth = large.report["cuda_max_allocated"] / small.report["cuda_max_allocated"]
            cuda = f", CUDA max allocated x{growth:.3f}"
        print(f"memory    {args.memory_factor}x the tokens: peak RSS x{large.max_rss / small.max_rss:.3f} "
              f"(target <= 1.10){cuda}")
    print()
    ratio = f"{harvest_rate / bare_rate:.2f}" if bare_rate and harvest_rate else "n/a"
    mem = (f" | {_mb(memory[0].max_rss)} | {_mb(memory[1].max_rss)} ({memory[1].max_rss / memory[0].max_rss:.2f})"
           if memory else " | - | -")
    row = (f"| {_cpu_model() if device == 'cpu' else device} | {b2.report.get('dtype', '?')} | {units} | "
           f"{_tok_s(bare_rate)} | {_tok_s(harvest_rate)} | {ratio}{mem} |")
    print(TABLE_HEAD.format(factor=args.memory_factor))
    print(row)
    return row


def _loop_rate(run: Run) -> float | None:
    if run.kind == "bare":
        return run.report["n_tokens"] / run.report["loop_seconds"] if run.report.get("loop_seconds") else None
    cli = _parse_cli_line(run.stdout)
    return cli["rate"] if cli else None


def _tok_s(rate: float | None) -> str:
    return f"{rate:,.0f} tok/s" if rate else "n/a"


def _parse_cli_line(stdout: str) -> dict | None:
    """`harvested N units over T tokens (C contexts) in Ss, R tokens/s -> STORE`, as featureatlas/cli.py prints it."""
    m = re.search(r"harvested ([\d,]+) units over ([\d,]+) tokens .* in \d+s, ([\d,]+) tokens/s", stdout)
    if m is None:
        return None
    units, tokens, rate = (int(g.replace(",", "")) for g in m.groups())
    return {"units": units, "tokens": tokens, "rate": rate}


def _progress_seconds(stderr: str) -> dict[str, int]:
    """The elapsed time on the last update of each of the harvest's progress bars (tqdm's `[MM:SS<` or `[H:MM:SS<`)."""
    found = {}
    for line in re.split(r"[\r\n]", stderr):
        m = re.match(r"\s*(harvest|store):.*\[(?:(\d+):)?(\d+):(\d+)<", line)
        if m:
            found[m.group(1)] = int(m.group(2) or 0) * 3600 + int(m.group(3)) * 60 + int(m.group(4))
    return found


def _embedded_corpus() -> str:
    """Asked of a child interpreter, so this process never imports torch (its RSS is every child's floor)."""
    return subprocess.run([sys.executable, "-c", "from featureatlas.load.corpus import embedded_corpus; "
                           "print(embedded_corpus())"], check=True, capture_output=True, text=True).stdout.strip()


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return "unknown CPU"


def _avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def _shown(cmd: list[str]) -> str:
    return " ".join(cmd)


if __name__ == "__main__":
    main()
