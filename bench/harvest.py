"""Harvest cost against the bare forward pass, measured side by side on the same batches in one run.

    python bench/harvest.py [--model smollm2-135m] [--batches 60] [--batch-size 16] [--context-length 64]

For each batch it times the bare backbone forward (inference_mode, same dtype, device and input; all layers;
no LM head) and then the same forward with every MLP neuron of every layer harvested (exact top-k), so drift
in machine speed hits both alike. It prints tokens/s for both and their ratio, over all batches and over the
second half (once the top-k lists are full, which is what a long harvest mostly runs in).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from featureatlas.harvest.architectures import blocks_of
from featureatlas.harvest.contexts import iter_batches, iter_contexts
from featureatlas.harvest.corpus import embedded_corpus, iter_documents
from featureatlas.harvest.harvester import Harvester
from featureatlas.harvest.models import load_model, pick_device, pick_dtype, resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", type=Path, default=None, help="default: the embedded Shakespeare corpus")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context-length", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    model, tokenizer = load_model(resolve_model(args.model), device, pick_dtype(args.dtype, device))
    has_bos = tokenizer.bos_token_id is not None
    contexts = iter_contexts(iter_documents(args.corpus or embedded_corpus()), tokenizer, args.context_length,
                             2 * args.batches * args.batch_size * args.context_length, lambda d: None)
    batches = [b for b, _ in iter_batches(contexts, args.batch_size, has_bos, 0) if not b.padded][: args.batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    layers = list(range(len(blocks_of(model.base_model, model.config.model_type))))

    def timed(run) -> float:
        sync()
        start = time.perf_counter()
        run()
        sync()
        return time.perf_counter() - start

    def bare(batch) -> None:
        with torch.inference_mode():
            model.base_model(input_ids=batch.input_ids.to(device), use_cache=False)

    timed(lambda: bare(batches[0]))  # warm-up
    t_bare, t_harvest = [], []
    accumulators = None  # one set for the whole run, as in a real harvest; hooks come off for the bare runs
    for batch in batches:
        t_bare.append(timed(lambda b=batch: bare(b)))
        with Harvester(model, layers, args.top_k, args.context_length, int(has_bos), accumulators) as harvester:
            accumulators = harvester.accumulators
            t_harvest.append(timed(lambda b=batch, h=harvester: h.step(b)))
    tokens = batches[0].input_ids.numel()
    n_units = sum(s.n_units for s in harvester.sources)
    print(f"{device} {model.dtype}: {len(batches)} batches of {args.batch_size}x{args.context_length} tokens, "
          f"{n_units:,} units, top-{args.top_k}")
    half = len(batches) // 2
    for label, part in (("all batches", slice(None)), (f"last {len(batches) - half}", slice(half, None))):
        bare_rate = tokens * len(t_bare[part]) / sum(t_bare[part])
        harvest_rate = tokens * len(t_harvest[part]) / sum(t_harvest[part])
        print(f"{label:>12}: bare forward {bare_rate:7.0f} tok/s | harvest {harvest_rate:7.0f} tok/s | "
              f"ratio harvest/bare {harvest_rate / bare_rate:.3f}")


if __name__ == "__main__":
    main()
