"""GPU benchmarks of the harvest for a machine lent for minutes: bench/harvest.py and bench/harvest_whole.py on
random-weight models in real models' shapes (bench/random_models.py), within a time budget.

    python bench/device_check.py [--device cuda|cpu] [--small] [--only STAGES] [--skip STAGES] [--out DIR]
                                 [--budget SECONDS] [--whole T1,T2,MEMORY,FACTOR] [--work DIR] [--keep]

bench/device_check.sh runs it on the GPU machine, after the parity tests (tests/test_gpu_parity.py and the CUDA
cases of tests/test_backends.py). Here, `python bench/device_check.py --device cpu --small` runs every stage on
small sizes.

Stages, in order (--only/--skip take stage names; each runs as a subprocess under its own time limit, and none
starts when less of the budget is left than it needs):
  goals     the goal rows first: a model shaped as SmolLM2-135M with all neurons, residual dimensions and a 16k SAE,
            and a ~1B LLaMA's neurons with a 16k SAE, each at batch 64 and 256; ratios against each goal
  neurons   bench/harvest.py on a model shaped as SmolLM2-135M, all MLP neurons
  backends  neurons and residual dimensions at batch 64 and 256, each with the Triton kernels (CUDA's default where
            Triton imports) and with the fixed-shape tensor step in CUDA graphs (FEATUREATLAS_TRITON=0): ratios
            side by side, and triton's harvest throughput over graphs'
  wide      neurons with batches of 4 times as many contexts (half as many batches)
  whole     bench/harvest_whole.py: whole processes, harvest against bare forward, and peak memory
  profile   neurons without CUDA graphs, 12 batches, the last 3 under torch.profiler (GPU time a kernel)
  sae       the same model, a random 16k-feature SAE on blocks.15.hook_resid_post only, with co-occurrence counted
            (on by default in `featureatlas harvest`): a top-k one (its room bounded by k) and a ReLU one letting
            about k fire (its room learned, each batch checked at the next)
  1b        bench/harvest.py on a ~1B LLaMA, neurons only
  resid     neurons with --resid (neurons and residual dimensions)
This process imports nothing heavy: bench/harvest_whole.py's children report their own peak memory, which Linux
would otherwise start from this process's. Output is streamed as it comes; OUT/device_check.json gets each stage's
status and key numbers, rewritten after every stage. Exit status 0 when every stage that ran passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "bench" / "device_assets" / "shakespeare.jsonl.gz"  # 42 plays, 1.56M SmolLM2 tokens


@dataclass(frozen=True)
class Sizes:
    dtype: str
    batch: int
    batches: int
    big_batches: int
    compile: str              # bench/harvest.py's and harvest_whole.py's --compile
    sae_features: int
    sae_k: int
    whole: tuple[int, int, int, int]  # harvest_whole.py's --t1, --t2, --memory-tokens, --memory-factor


FULL = Sizes(dtype="bfloat16", batch=64, batches=40, big_batches=20, compile="on", sae_features=16384, sae_k=32,
             whole=(200_000, 600_000, 100_000, 10))
SMALL = Sizes(dtype="float32", batch=8, batches=4, big_batches=2, compile="off", sae_features=256, sae_k=16,
              whole=(1_000, 3_000, 1_000, 2))
# name: (the most seconds it may run, the seconds it needs to be worth starting)
STAGES = {"goals": (420, 150), "neurons": (150, 30), "backends": (120, 60), "wide": (120, 30), "whole": (240, 60),
          "profile": (90, 30), "sae": (150, 50), "1b": (150, 45), "resid": (90, 30)}
BENCH_LINE = re.compile(r"^\s*(all batches|last \d+): bare forward\s+(\d+) tok/s \| harvest\s+(\d+) tok/s \| "
                        r"ratio harvest/bare ([\d.]+)", re.M)


class StageFailed(Exception):
    """A stage that ran but did not finish well: its message says how."""


def run_streamed(cmd: list[str], timeout: float, extra_env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """cmd in its own process group, its output printed as it comes (tqdm's redraws folded to their last state);
    (exit status, or None when it ran past timeout and was stopped; the whole output). extra_env: on top of ours."""
    shown = " ".join(f"{key}={value}" for key, value in (extra_env or {}).items())
    print(f"$ {shown + ' ' if shown else ''}{shlex.join(cmd)}   (timeout {timeout:.0f}s)", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", **(extra_env or {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            lines.append(raw.decode(errors="replace").rstrip("\n").split("\r")[-1])
            print("  | " + lines[-1], flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        print(f"!! timed out after {timeout:.0f}s; stopping it", flush=True)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=5)
                break
            except (ProcessLookupError, PermissionError):
                break
            except subprocess.TimeoutExpired:
                continue
        rc = None
    reader.join(timeout=5)
    return rc, "\n".join(lines)


class Bench:
    """The stages' shared inputs, each made by a subprocess the first time a stage needs it."""

    def __init__(self, args: argparse.Namespace, work: Path, deadline: float):
        self.args, self.work, self.deadline = args, work, deadline
        self.sizes = SMALL if args.small else FULL
        self.limit = 0.0  # the running stage's own limit
        self._made: dict[str, Path] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, cmd: list[str], extra_env: dict[str, str] | None = None) -> tuple[int | None, str]:
        return run_streamed(cmd, min(self.limit, self.left()), extra_env)

    def made(self, name: str, cmd: list[str]) -> Path:
        if name not in self._made:
            out = self.work / name
            rc, _ = self.run([sys.executable, str(REPO / "bench" / "random_models.py"), *cmd, str(out)])
            if rc != 0:
                raise StageFailed(f"bench/random_models.py {cmd[0]} exit {rc}")
            self._made[name] = out
        return self._made[name]

    def model(self, shape: str) -> Path:
        return self.made(shape, ["model", "--shape", shape, "--device", self.args.device, "--dtype", self.sizes.dtype,
                                 *(["--small"] if self.args.small else [])])

    def sae(self, shape: str = "smollm2-135m", relu: bool = False) -> Path:
        """A random top-k dictionary (relu: a ReLU one letting about k fire) on a middle layer's residual stream of
        a model of `shape`."""
        s = self.sizes
        d_in, layer = SAE_SITES[shape][self.args.small]
        return self.made(f"sae-{shape}" + ("-relu" if relu else ""),
                         ["sae", "--d-in", str(d_in), "--d-sae", str(s.sae_features), "--k", str(s.sae_k), "--hook",
                          f"blocks.{layer}.hook_resid_post", *(["--relu"] if relu else [])])

    def harvest(self, rec: dict, model: Path, extra: list[str], batches: int, batch: int | None = None,
                extra_env: dict[str, str] | None = None) -> None:
        """bench/harvest.py; its rates and ratios into rec."""
        s = self.sizes
        rc, output = self.run([sys.executable, str(REPO / "bench" / "harvest.py"), "--model", str(model), "--corpus",
                               str(CORPUS), "--device", self.args.device, "--dtype", s.dtype, "--batch-size",
                               str(batch or s.batch), "--batches", str(batches), "--compile", s.compile, *extra],
                              extra_env)
        rec["exit"] = rc
        for label, bare, harvest, ratio in BENCH_LINE.findall(output):
            rec[label] = dict(bare_tok_s=int(bare), harvest_tok_s=int(harvest), ratio=float(ratio))
        rec["what"] = next((line for line in output.splitlines() if " batches of " in line), None)
        if rc != 0:
            raise StageFailed(f"bench/harvest.py exit {rc}")


# The goal rows: (model shape, bench/harvest.py options besides the SAE, the goal ratio)
GOALS = {"all units of SmolLM2-135M": ("smollm2-135m", ["--resid"], 0.90),
         "1B LLaMA, all neurons and a 16k SAE": ("llama-1b", [], 0.95)}
# (residual width, layer) of the dictionary on each shape, full size and --small
SAE_SITES = {"smollm2-135m": {False: (576, 15), True: (64, 1)}, "llama-1b": {False: (2048, 8), True: (128, 1)}}


def stage_goals(b: Bench, rec: dict) -> None:
    """The goal rows on this device, with the default backend (the Triton kernels where Triton imports): all
    neurons, (for SmolLM2's shape) residual dimensions and a 16k-feature SAE, at the usual batch and four times
    it; the SAE's encode counts as part of the bare forward. A table of ratios against the goals."""
    failed = []
    for case, (shape, extra, goal) in GOALS.items():
        try:
            model, sae = b.model(shape), b.sae(shape)
            for batch, batches in ((b.sizes.batch, max(b.sizes.batches // 2, 4)),
                                   (4 * b.sizes.batch, max(b.sizes.batches // 6, 3))):
                run = rec.setdefault(case, {}).setdefault(f"batch {batch}", {"goal": goal})
                try:
                    b.harvest(run, model, [*extra, "--sae", str(sae)], batches, batch=batch)
                except StageFailed as err:
                    failed.append(f"{case} at batch {batch}: {err}")
        except StageFailed as err:
            failed.append(f"{case}: {err}")
        finally:
            if shape == "llama-1b":
                shutil.rmtree(b.work / shape, ignore_errors=True)  # gigabytes of scratch
                b._made.pop(shape, None)
    print("\n  case                                  batch  ratio all  ratio last  goal", flush=True)
    for case, runs in rec.items():
        for batch, run in runs.items():
            last = next((v for k, v in run.items() if k.startswith("last ")), {})
            print(f"  {case:<36}  {batch.split()[-1]:>5}  {run.get('all batches', {}).get('ratio', float('nan')):>9.3f}"
                  f"  {last.get('ratio', float('nan')):>10.3f}  >= {run['goal']}", flush=True)
    if failed:
        raise StageFailed("; ".join(failed))


def stage_neurons(b: Bench, rec: dict) -> None:
    b.harvest(rec, b.model("smollm2-135m"), [], b.sizes.batches)


# bench/harvest.py's environment for each backend compared by stage_backends
BACKEND_ENV = {"triton": {}, "graphs": {"FEATUREATLAS_TRITON": "0"}}


def stage_backends(b: Bench, rec: dict) -> None:
    """The Triton kernels against the tensor step in CUDA graphs, neurons and residual dimensions, at the usual
    batch and four times it (64 and 256 at full size); a table of ratios and triton's throughput over graphs'."""
    model = b.model("smollm2-135m")
    sizes = [(b.sizes.batch, max(b.sizes.batches // 2, 4)), (4 * b.sizes.batch, max(b.sizes.batches // 6, 3))]
    failed = []
    for batch, batches in sizes:
        for name, env in BACKEND_ENV.items():
            run = rec.setdefault(f"batch {batch}", {}).setdefault(name, {})
            try:
                b.harvest(run, model, ["--resid"], batches, batch=batch, extra_env=env)
            except StageFailed as err:
                failed.append(f"{name} at batch {batch}: {err}")
    print("\n  batch  backend  (as run)          ratio all  ratio last  harvest tok/s (last)", flush=True)
    for batch, _ in sizes:
        runs = rec[f"batch {batch}"]
        for name, run in runs.items():
            last = next((v for k, v in run.items() if k.startswith("last ")), {})
            ran = re.search(r"backend (\w+)", run.get("what") or "")
            ratio_all = run.get("all batches", {}).get("ratio", float("nan"))
            print(f"  {batch:>5}  {name:<7}  ({ran.group(1) if ran else '?':<15})  {ratio_all:>9.3f}  "
                  f"{last.get('ratio', float('nan')):>10.3f}  {last.get('harvest_tok_s', 0):>10}", flush=True)
        rates = [next((v.get("harvest_tok_s") for k, v in runs.get(n, {}).items() if k.startswith("last ")), None)
                 for n in ("triton", "graphs")]
        if all(rates):
            runs["triton_over_graphs"] = round(rates[0] / rates[1], 3)
            print(f"  {batch:>5}  triton's harvest throughput / graphs': {runs['triton_over_graphs']:.3f}", flush=True)
    if failed:
        raise StageFailed("; ".join(failed))


def stage_wide(b: Bench, rec: dict) -> None:
    """What launching small kernels costs against a longer forward pass."""
    b.harvest(rec, b.model("smollm2-135m"), [], max(b.sizes.batches // 2, 2), batch=4 * b.sizes.batch)


def stage_profile(b: Bench, rec: dict) -> None:
    b.harvest(rec, b.model("smollm2-135m"), ["--cuda-graphs", "off", "--profile", "3"], 12)


def stage_sae(b: Bench, rec: dict) -> None:
    for kind, relu in (("top-k", False), ("relu", True)):
        b.harvest(rec.setdefault(kind, {}), b.model("smollm2-135m"),
                  ["--layers", "none", "--sae", str(b.sae(relu=relu)), "--cooccurrence"], b.sizes.batches)


def stage_1b(b: Bench, rec: dict) -> None:
    model = b.model("llama-1b")
    try:
        b.harvest(rec, model, [], b.sizes.big_batches)
    finally:
        shutil.rmtree(model, ignore_errors=True)  # gigabytes of scratch
        b._made.pop("llama-1b", None)


def stage_resid(b: Bench, rec: dict) -> None:
    b.harvest(rec, b.model("smollm2-135m"), ["--resid"], b.sizes.batches)


def stage_whole(b: Bench, rec: dict) -> None:
    s = b.sizes
    t1, t2, memory, factor = b.args.whole or s.whole
    rc, output = b.run([sys.executable, str(REPO / "bench" / "harvest_whole.py"), "--model",
                        str(b.model("smollm2-135m")), "--corpus", str(CORPUS), "--device", b.args.device, "--dtype",
                        s.dtype, "--batch-size", str(s.batch), "--t1", str(t1), "--t2", str(t2), "--memory-tokens",
                        str(memory), "--memory-factor", str(factor), "--compile", s.compile, "--repeats", "1"])
    rec["exit"] = rc
    found = re.search(r"^ratio\s+([\d.]+)", output, re.M)
    rec["ratio"] = float(found.group(1)) if found else None
    rec["runs"] = re.findall(r"^\s+\[(?:\d+/\d+|memory)\] .*$", output, re.M)
    found = re.search(r"^memory\s+(.*)$", output, re.M)
    rec["memory"] = found.group(1) if found else None
    if rc != 0:
        raise StageFailed(f"bench/harvest_whole.py exit {rc}")


STAGE_FUNCTIONS = {"goals": stage_goals, "neurons": stage_neurons, "backends": stage_backends,
                   "wide": stage_wide, "whole": stage_whole, "profile": stage_profile,
                   "sae": stage_sae, "1b": stage_1b, "resid": stage_resid}


def selected(only: str | None, skip: str | None) -> list[str]:
    def names(spec: str | None) -> set[str]:
        given = {part.strip() for part in (spec or "").split(",") if part.strip()}
        unknown = given - set(STAGES)
        if unknown:
            raise SystemExit(f"--only/--skip: unknown stage {sorted(unknown)[0]!r}; stages: {', '.join(STAGES)}")
        return given

    wanted, left_out = names(only), names(skip)
    return [n for n in STAGES if (not wanted or n in wanted) and n not in left_out]


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
    ap.add_argument("--only", default=None, help="comma-separated stages to run")
    ap.add_argument("--skip", default=None, help="comma-separated stages to leave out")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/device_check_out"),
                    help="where device_check.json goes (default: $OUT, else /tmp/device_check_out)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all stages (default: 380, 240 with --small)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (models)")
    ap.add_argument("--whole", type=_whole, default=None, metavar="T1,T2,MEMORY,FACTOR",
                    help="bench/harvest_whole.py's --t1, --t2, --memory-tokens, --memory-factor (default: "
                         "200000,600000,100000,10; with --small 1000,3000,1000,2)")
    args = ap.parse_args()
    names = selected(args.only, args.skip)
    budget = args.budget or (240.0 if args.small else 380.0)
    started = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="featureatlas-device-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work, started + budget)
    summary: dict = {"device": args.device, "small": args.small, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "budget_s": budget, "stages": {}}
    path = args.out / "device_check.json"

    def write() -> None:
        summary["ok"] = all(s.get("status") in ("ok", "skipped") for s in summary["stages"].values())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(path.with_suffix(".tmp"), path)

    print(f"device_check: device {args.device}{' (small sizes)' if args.small else ''}, stages {', '.join(names)}, "
          f"budget {budget:.0f}s, scratch {work}, summary {path}", flush=True)
    for name in names:
        rec = summary["stages"][name] = {}
        limit, need = STAGES[name]
        if bench.left() < need:
            print(f"\n== {name}: skipped ({bench.left():.0f}s left of the budget, it needs {need}s)", flush=True)
            rec.update(status="skipped", reason=f"{bench.left():.0f}s left of the budget")
            write()
            continue
        print(f"\n== {name}  ({time.monotonic() - started:.0f}s in, {bench.left():.0f}s left)", flush=True)
        bench.limit = limit
        t0 = time.perf_counter()
        try:
            STAGE_FUNCTIONS[name](bench, rec)
            rec["status"] = "ok"
        except StageFailed as err:
            rec.update(status="failed", error=str(err))
            print(f"!! {name} FAILED: {err}", flush=True)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"-- {name}: {rec['status']} in {rec['seconds']:.1f}s", flush=True)
        write()
    summary["total_s"] = round(time.monotonic() - started, 1)
    write()
    print("\n== summary")
    for name, rec in summary["stages"].items():
        print(f"  {name:<8} {rec.get('status', '?'):<8} {rec.get('seconds', 0):>6}s  {rec.get('error', '')[:300]}")
    print(f"  total {summary['total_s']}s; {'ALL PASSED' if summary['ok'] else 'SOME STAGES FAILED'}; summary in "
          f"{path}", flush=True)
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
