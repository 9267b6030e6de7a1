"""Harvest cost against the bare forward pass, measured side by side on the same batches in one run.

    python bench/harvest.py [--model smollm2-135m] [--batches 60] [--batch-size 16] [--resid] [--sae DIR]
                            [--cuda-graphs on|off] [--cooccurrence] [--heads LAYERS] [--parts] [--profile N]

For each batch it times the bare backbone forward (inference_mode, same dtype, device and input; all layers;
no LM head) plus the bare encode of every --sae dictionary on its hooked tensor, and then the same forward
with every unit harvested (top and bottom examples, statistics, histograms, quantile and random samples), so
drift in machine speed hits both alike. It prints tokens/s for both and their ratio, over all batches and over
the second half (once the examples are mostly settled, which is what a long harvest mostly runs in). With
--cooccurrence, each batch also runs through a second harvester that counts the dictionaries' co-occurrence
(harvest/cooccurrence.py); with --heads, through one that harvests those layers' attention heads as well
(harvest/heads.py); each one's cost is printed against the same harvest without, on the same batches. With
--parts, it also prints where the harvest's time beyond the forward goes: each kind of source's updates, and the
dictionaries' encodes, per batch and against the bare forward (on CUDA each part is timed between two
synchronisations, which slows the harvest it times: read the ratios from a run without).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from featureatlas.allocator import keep_freed_memory
from featureatlas.harvest.accumulators import Settings, choose_backend
from featureatlas.harvest.contexts import iter_batches, iter_contexts
from featureatlas.harvest.harvester import Harvester
from featureatlas.harvest.heads import head_sources
from featureatlas.harvest.run import HarvestConfig, build_sources
from featureatlas.harvest.sources import parse_layers
from featureatlas.load.corpus import embedded_corpus, iter_documents
from featureatlas.load.models import load_model, pick_device, pick_dtype, resolve_model

DEFAULTS = HarvestConfig(model="", corpus="", out="")  # the harvest's own defaults


def main() -> None:
    keep_freed_memory()  # as the featureatlas command does (featureatlas/allocator.py)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", type=Path, default=None, help="default: the embedded Shakespeare corpus")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context-length", type=int, default=DEFAULTS.context_length)
    ap.add_argument("--top-k", type=int, default=DEFAULTS.top_k)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--layers", default="all", help="MLP neurons of these layers (none: no neurons)")
    ap.add_argument("--resid", action="store_true", help="also every layer's residual dimensions")
    ap.add_argument("--sae", action="append", default=[], help="a dictionary folder (repeatable)")
    ap.add_argument("--compile", choices=["on", "off"], default="on", help="fused reductions (reductions.py)")
    ap.add_argument("--cuda-graphs", choices=["on", "off"], default="on", help="as harvest's (graphs.py)")
    ap.add_argument("--heads", default=None, metavar="LAYERS",
                    help="also time a harvest with these layers' attention heads added, against the one without")
    ap.add_argument("--cooccurrence", action="store_true",
                    help="also time the harvest counting the dictionaries' co-occurrence, against it without")
    ap.add_argument("--parts", action="store_true",
                    help="also print each source kind's update time and the encodes' a batch, against the forward")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then profile N more harvest steps and print their costliest operations (on CUDA, by GPU "
                         "time; pass --cuda-graphs off to see the kernels a graph would replay)")
    args = ap.parse_args()
    device = pick_device(args.device)
    model, tokenizer = load_model(resolve_model(args.model), device, pick_dtype(args.dtype, device))
    has_bos = tokenizer.bos_token_id is not None
    contexts = iter_contexts(iter_documents(args.corpus or embedded_corpus()), tokenizer, args.context_length,
                             2 * args.batches * args.batch_size * args.context_length, lambda d: None)
    batches = [b for b, _ in iter_batches(contexts, args.batch_size, has_bos, 0) if not b.padded][: args.batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sources = build_sources(model, HarvestConfig(model=args.model, corpus=Path("."), out=Path("."),
                                                 layers=args.layers, resid="all" if args.resid else None,
                                                 saes=args.sae), device)
    encodes = [s for s in sources if s.encode is not None]

    def timed(run) -> float:
        sync()
        start = time.perf_counter()
        run()
        sync()
        return time.perf_counter() - start

    if any(s.hook.name != f"blocks.{s.layer}.hook_resid_post" for s in encodes):
        raise SystemExit("the bench times the bare encode of dictionaries on hook_resid_post only")

    def bare(batch) -> None:
        with torch.inference_mode():
            hidden = model.base_model(input_ids=batch.input_ids.to(device), use_cache=False,
                                      output_hidden_states=bool(encodes)).hidden_states
            for source in encodes:  # resid_post of layer L is hidden_states[L + 1]
                source.encode(hidden[source.layer + 1])

    timed(lambda: bare(batches[0]))  # warm-up
    t_bare, t_harvest = [], []
    settings = Settings(top_k=args.top_k, bottom_k=args.top_k, compile=args.compile == "on",  # as harvest chooses
                        backend=choose_backend(device, cuda_graphs=args.cuda_graphs == "on"))
    with Harvester(model, sources, settings, args.context_length, int(has_bos)) as warm_up:
        warm_up.step(batches[0])  # compiles the fused reductions (once per process) before anything is timed
    variants: dict[str, tuple[Harvester, list[float]]] = {}  # each hooked only while it runs
    if args.cooccurrence:
        variants["co-occurrence"] = (Harvester(model, sources, replace(settings, cooccurrence=True),
                                               args.context_length, int(has_bos)), [])
    if args.heads:
        with_heads = sources + head_sources(model, parse_layers(args.heads, model.config.num_hidden_layers, "heads"))
        variants["heads"] = (Harvester(model, with_heads, settings, args.context_length, int(has_bos)), [])
    for each, _ in variants.values():
        each.detach()
    counting = variants.get("co-occurrence", (None,))[0]
    harvester = Harvester(model, [replace(s) for s in sources], settings, args.context_length, int(has_bos))
    harvester.detach()  # (its own copies of the sources: --parts wraps their encodes, not the variants')
    parts = timed_parts(harvester, sync) if args.parts else {}
    timings = [(harvester, t_harvest), *variants.values()]
    for i, batch in enumerate(batches):  # one set of accumulators for the whole run; hooks on only while it runs
        t_bare.append(timed(lambda b=batch: bare(b)))
        for times in parts.values():
            times.append(0.0)
        for each, times in timings if i % 2 == 0 else timings[::-1]:  # with and without, in turn first
            each.attach()
            times.append(timed(lambda b=batch, h=each: h.step(b)))
            each.detach()
    tokens = batches[0].input_ids.numel()
    n_units = sum(s.n_units for s in harvester.sources)
    print(f"{device} {model.dtype}: {len(batches)} batches of {args.batch_size}x{args.context_length} tokens, "
          f"{n_units:,} units ({', '.join(sorted({s.name for s in sources}))}), top-{args.top_k}, "
          f"compile {args.compile}, backend {settings.backend.value}")
    half = len(batches) // 2
    for label, part in (("all batches", slice(None)), (f"last {len(batches) - half}", slice(half, None))):
        bare_rate = tokens * len(t_bare[part]) / sum(t_bare[part])
        harvest_rate = tokens * len(t_harvest[part]) / sum(t_harvest[part])
        print(f"{label:>12}: bare forward {bare_rate:7.0f} tok/s | harvest {harvest_rate:7.0f} tok/s | "
              f"ratio harvest/bare {harvest_rate / bare_rate:.3f}")
        for name, (_, times) in variants.items():
            rate = tokens * len(times[part]) / sum(times[part])
            print(f"{'':>12}  harvest with {name} {rate:7.0f} tok/s | ratio with/without {rate / harvest_rate:.3f}")
    if parts:
        print(f"where the harvest's time beyond the forward goes, a batch, over the last {len(batches) - half} "
              f"(the bare forward with the encodes: {1000 * sum(t_bare[half:]) / (len(batches) - half):.0f} ms)")
        for name, times in sorted(parts.items(), key=lambda item: -sum(item[1][half:])):
            spent = sum(times[half:])
            print(f"{name:>24}: {1000 * spent / (len(batches) - half):8.1f} ms | {spent / sum(t_bare[half:]):6.1%} "
                  "of the bare forward")
    if counting is not None:
        for source, acc in zip(counting.sources, counting.accumulators, strict=True):
            pairs = acc.cooccurrence
            if pairs is not None:
                pairs.nearest(1)  # merges what is still buffered
                print(f"co-occurrence of {source.name}: {len(pairs.keys):,} distinct pairs kept, "
                      f"{'complete' if pairs.complete else 'rarest dropped'}")
    if args.profile:
        profile_steps(harvester, batches[-args.profile:], device)


def timed_parts(harvester: Harvester, sync) -> dict[str, list[float]]:
    """--parts: wraps each source's update (by kind: 'mlp updates', ...) and each dictionary's encode, adding
    their seconds to the last entry of that part's list (main appends one a batch)."""
    parts: dict[str, list[float]] = {}

    def timing(name: str, fn):
        times = parts.setdefault(name, [])

        def call(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            if times:  # the warm-up before the first batch is not counted
                times[-1] += time.perf_counter() - start
            return out
        return call

    for source, acc in zip(harvester.sources, harvester.accumulators, strict=True):
        acc.update = timing(f"{source.kind} updates", acc.update)
        if source.dictionary is not None:
            source.activations = timing(f"{source.kind} encodes", source.activations)
            source.activations_and_nonzeros = timing(f"{source.kind} encodes", source.activations_and_nonzeros)
    return parts


def profile_steps(harvester: Harvester, batches: list, device: torch.device) -> None:
    """The harvest steps' costliest operations (forward pass included), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    harvester.attach()
    with profile(activities=activities) as prof:
        for batch in batches:
            harvester.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    harvester.detach()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of {len(batches)} harvest steps, by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
