"""What `harvest --ablation-effects` costs: the same harvest with and without it, side by side in one process.

    python bench/ablation.py [--model smollm2-135m] [--corpus C] [--tokens 4000] [--layers 12] [--resid]
                             [--sae DIR] [--top-k 20] [--batch-size 64] [--dtype float32] [--device auto]
                             [--repeats 2] [--threads N]

The model is loaded once and handed to both harvests (harvest()'s `loaded`), which alternate --repeats times, each
writing a temporary store; each side keeps its fastest wall time. Printed: both times, their ratio, and the
post-pass alone: the top examples it ablated (units x top-k, two forward passes of one context each, batched) and
their rate. The post-pass grows with the units and top-k, not with the tokens harvested. On a CPU shared with other
jobs, --threads 1 keeps torch's threads from waiting on each other (several times faster there).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import duckdb
import torch

from featureatlas.harvest.config import HarvestConfig
from featureatlas.harvest.run import harvest
from featureatlas.load.corpus import embedded_corpus
from featureatlas.load.models import load_model, pick_device, pick_dtype, resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", type=Path, default=None, help="default: the embedded corpus")
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--layers", default="12", help="MLP layers, as harvest --layers takes them")
    ap.add_argument("--resid", action="store_true", help="also the residual dimensions of those layers")
    ap.add_argument("--sae", action="append", default=[], help="a dictionary folder (repeatable)")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = pick_device(args.device)
    ref = resolve_model(args.model)
    model, tokenizer = load_model(ref, device, pick_dtype(args.dtype, device))
    best = {False: float("inf"), True: float("inf")}
    rows = 0
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for ablations in (False, True):
                out = Path(folder) / f"{repeat}-{ablations}.duckdb"
                config = HarvestConfig(model=args.model, corpus=args.corpus or embedded_corpus(), out=out,
                                       tokens=args.tokens, layers=args.layers, resid=args.layers if args.resid
                                       else None, saes=args.sae, top_k=args.top_k, batch_size=args.batch_size,
                                       dtype=args.dtype, device=str(device), compile="off", progress=False,
                                       ablation_effects=ablations)
                start = time.perf_counter()
                harvest(config, loaded=(model, tokenizer, ref))
                best[ablations] = min(best[ablations], time.perf_counter() - start)
                if ablations:
                    with duckdb.connect(str(out), read_only=True) as con:
                        rows = con.execute("SELECT count(*) FROM ablations").fetchone()[0]
    extra = best[True] - best[False]
    print(f"{device} {model.dtype}: {args.tokens:,} tokens, layers {args.layers}{' + resid' if args.resid else ''}"
          f"{f' + {len(args.sae)} dictionaries' if args.sae else ''}, top-{args.top_k}, batch {args.batch_size}, "
          f"best of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"harvest {best[False]:.1f} s | with --ablation-effects {best[True]:.1f} s | ratio with/without "
          f"{best[True] / best[False]:.2f}")
    print(f"post-pass: {rows:,} top examples ablated in about {extra:.1f} s "
          f"({rows / extra if extra > 0 else float('inf'):,.0f} examples/s)")


if __name__ == "__main__":
    main()
