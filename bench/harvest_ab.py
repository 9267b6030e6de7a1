"""The harvest step of this working tree against a git revision's, on the same batches in one process.

    python bench/harvest_ab.py [--against HEAD] [--batches 30] [--batch-size 64] [--dtype float32] [--resid]
                               [--sae DIR]

A change to the accumulators moves the ratio by less than this machine's speed drifts between two runs, so the
two codes are timed side by side: per batch, the bare backbone forward, then each harvester's step, in turns
that alternate. The revision is exported with `git archive` and imported under another package name. It prints
each side's tokens/s and its ratio to the bare forward (which here does not include a dictionary's encode), and
the median over batches of the two steps' time ratio, which drift in the machine's speed barely moves.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from featureatlas.allocator import keep_freed_memory
from featureatlas.harvest import harvester as current_harvester
from featureatlas.harvest import run as current_run
from featureatlas.harvest.config import HarvestConfig
from featureatlas.harvest.contexts import iter_batches, iter_contexts
from featureatlas.load.corpus import embedded_corpus, iter_documents
from featureatlas.load.models import load_model, pick_device, pick_dtype, resolve_model

DEFAULTS = HarvestConfig(model="", corpus="", out="")  # the harvest's own defaults

REPO = Path(__file__).resolve().parent.parent
ALIAS = "featureatlas_base"
PARTS = ("load", "harvest", "store", "build", "export", "annotate", "serve", "site_templates")  # package-dir folders


def import_revision(revision: str, folder: Path) -> tuple:
    """(harvester, run) modules of `revision`, imported as featureatlas_base.*."""
    source = folder / "src"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    package = folder / ALIAS
    shutil.copytree(source / "featureatlas", package)
    for part in PARTS:
        if (source / part).is_dir():  # older revisions have fewer
            shutil.copytree(source / part, package / part)
    for path in package.rglob("*.py"):
        text = re.sub(r"\bfeatureatlas\b(?=[. ])", ALIAS, path.read_text())
        path.write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{ALIAS}.harvest.harvester"), importlib.import_module(f"{ALIAS}.harvest.run")


def settings_of(harvester: object, device: torch.device) -> object:
    """The harvest's settings with compile on, as each revision spells them: a backend chosen for the device, or
    (revisions before backends) the fixed_shapes flag."""
    settings = harvester.Settings
    if "backend" in {f.name for f in dataclasses.fields(settings)}:
        choose_backend = importlib.import_module(settings.__module__).choose_backend
        return settings(compile=True, backend=choose_backend(device))
    return settings(compile=True, fixed_shapes=device.type == "cuda")


def main() -> None:
    keep_freed_memory()  # as the featureatlas command does (featureatlas/allocator.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="HEAD", help="git revision to compare with (default: HEAD)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    ap.add_argument("--context-length", type=int, default=DEFAULTS.context_length)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--resid", action="store_true", help="also every layer's residual dimensions")
    ap.add_argument("--sae", action="append", default=[], help="a dictionary folder (repeatable)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        base_harvester, base_run = import_revision(args.against, Path(folder))
        device = pick_device(args.device)
        model, tokenizer = load_model(resolve_model(args.model), device, pick_dtype(args.dtype, device))
        has_bos = tokenizer.bos_token_id is not None
        contexts = iter_contexts(iter_documents(embedded_corpus()), tokenizer, args.context_length,
                                 2 * args.batches * args.batch_size * args.context_length, lambda d: None)
        batches = [b for b, _ in iter_batches(contexts, args.batch_size, has_bos, 0) if not b.padded][: args.batches]
        options = dict(model=args.model, corpus=Path("."), out=Path("."), layers="all",
                       resid="all" if args.resid else None, saes=args.sae)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        harvesters = {}
        for name, harvester, run in ((args.against, base_harvester, base_run),
                                     ("working tree", current_harvester, current_run)):
            sources = run.build_sources(model, run.HarvestConfig(**options), device)
            settings = settings_of(harvester, device)
            with harvester.Harvester(model, sources, settings, args.context_length, int(has_bos)) as warm_up:
                warm_up.step(batches[0])  # compiles before anything is timed
            harvesters[name] = harvester.Harvester(model, sources, settings, args.context_length, int(has_bos))
            harvesters[name].detach()
        seconds: dict[str, list[float]] = {"bare": [], **{name: [] for name in harvesters}}
        for i, batch in enumerate(batches):
            names = list(harvesters) if i % 2 == 0 else list(reversed(harvesters))
            with torch.inference_mode():
                sync()
                start = time.perf_counter()
                model.base_model(input_ids=batch.input_ids.to(device), use_cache=False)
                sync()
                seconds["bare"].append(time.perf_counter() - start)
            for name in names:
                harvesters[name].attach()
                sync()
                start = time.perf_counter()
                harvesters[name].step(batch)
                sync()
                seconds[name].append(time.perf_counter() - start)
                harvesters[name].detach()
    tokens = batches[0].input_ids.numel()
    print(f"{device} {model.dtype}: {len(batches)} batches of {args.batch_size}x{args.context_length} tokens")
    half = len(batches) // 2
    for label, part in (("all batches", slice(None)), (f"last {len(batches) - half}", slice(half, None))):
        rates = {name: tokens * len(s[part]) / sum(s[part]) for name, s in seconds.items()}
        print(f"{label:>12}: bare {rates['bare']:6.0f} tok/s | " + " | ".join(
            f"{name} {rates[name]:6.0f} tok/s ({rates[name] / rates['bare']:.3f})" for name in harvesters))
    base, current = (seconds[name] for name in harvesters)
    paired = sorted(c / b for b, c in zip(base, current, strict=True))  # each batch's two steps ran back to back
    print(f"median over batches of the working tree's step time / {args.against}'s: {paired[len(paired) // 2]:.3f} "
          f"(quartiles {paired[len(paired) // 4]:.3f} to {paired[3 * len(paired) // 4]:.3f})")


if __name__ == "__main__":
    main()
