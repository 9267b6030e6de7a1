"""The two kinds of child process that bench/harvest_whole.py times from outside; not meant to be run by hand.

    python bench/harvest_whole_child.py bare --report FILE --model M --corpus C --tokens T [--batch-size B] …
    python bench/harvest_whole_child.py harvest --report FILE -- <the arguments of `featureatlas harvest`>

bare: loads the model as the harvest does (harvest/models.py load_model, same device and dtype), cuts the corpus
into the same contexts and batches (harvest/contexts.py, same pad id), and runs only the backbone forward
(`model.base_model`, inference_mode, no cache, all layers, no LM head) on each batch, with the allocator set as
the command sets it (featureatlas/allocator.py), plus the bare encode of each
--sae dictionary on its hooked tensor, as bench/harvest.py does. Tokenising is lazy, as in the harvest.

harvest: calls `featureatlas.cli.main(["harvest", …])`, the very function the `featureatlas` console script calls,
so the process is the command's; the wrapper only adds, after it returns, the CUDA peak memory (which only the
process itself can read) to the report.

Each writes one JSON object to --report: what it ran on, and for bare the seconds of its phases.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from featureatlas.harvest.config import HarvestConfig

DEFAULTS = HarvestConfig(model="", corpus="", out="")  # the harvest's own defaults


def _cuda_report(torch) -> dict:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    torch.cuda.synchronize()
    return {"cuda_max_allocated": torch.cuda.max_memory_allocated(),
            "cuda_max_reserved": torch.cuda.max_memory_reserved(),
            "cuda_device": torch.cuda.get_device_name()}


def bare(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="harvest_whole_child.py bare")
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    ap.add_argument("--context-length", type=int, default=DEFAULTS.context_length)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--sae", action="append", default=[])
    args = ap.parse_args(argv)

    import torch

    from featureatlas.allocator import keep_freed_memory
    from featureatlas.harvest.contexts import iter_batches, iter_contexts
    from featureatlas.load.corpus import iter_documents
    from featureatlas.load.models import load_model, pick_device, pick_dtype, resolve_model
    keep_freed_memory()  # as the featureatlas command does, so that the ratio compares like with like

    t0 = time.perf_counter()
    device = pick_device(args.device)
    model, tokenizer = load_model(resolve_model(args.model), device, pick_dtype(args.dtype, device))
    encodes = []
    if args.sae:  # the dictionaries' bare encode, as bench/harvest.py times it
        from featureatlas.harvest.run import HarvestConfig, build_sources
        sources = build_sources(model, HarvestConfig(model=args.model, corpus=Path("."), out=Path("."),
                                                     layers="none", saes=args.sae), device)
        encodes = [s for s in sources if s.encode is not None]
        if any(s.hook.name != f"blocks.{s.layer}.hook_resid_post" for s in encodes):
            raise SystemExit("the bench times the bare encode of dictionaries on hook_resid_post only")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t1 = time.perf_counter()
    has_bos = tokenizer.bos_token_id is not None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # as harvest/run.py
    contexts = iter_contexts(iter_documents(args.corpus), tokenizer, args.context_length, args.tokens,
                             lambda d: None)
    n_tokens = n_batches = 0
    with torch.inference_mode():
        for batch, _ in iter_batches(contexts, args.batch_size, has_bos, pad_id):
            hidden = model.base_model(input_ids=batch.input_ids.to(device), use_cache=False,
                                      output_hidden_states=bool(encodes)).hidden_states
            for source in encodes:  # resid_post of layer L is hidden_states[L + 1]
                source.encode(hidden[source.layer + 1])
            n_tokens += batch.n_text_tokens
            n_batches += 1
    sync()
    t2 = time.perf_counter()
    return {"load_seconds": t1 - t0, "loop_seconds": t2 - t1, "n_tokens": n_tokens, "n_batches": n_batches,
            "dtype": str(model.dtype).removeprefix("torch."), "device": str(device), **_cuda_report(torch)}


def harvest(argv: list[str]) -> dict:
    import torch

    from featureatlas.cli import main

    rc = main(["harvest", *argv])
    if rc:
        raise SystemExit(rc)
    return _cuda_report(torch)


def run() -> None:
    kind, argv = sys.argv[1], sys.argv[2:]
    if argv[:1] != ["--report"] or len(argv) < 2:
        raise SystemExit("usage: harvest_whole_child.py bare|harvest --report FILE …")
    report, argv = Path(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    result = {"bare": bare, "harvest": harvest}[kind](argv)
    report.write_text(json.dumps(result))


if __name__ == "__main__":
    run()
