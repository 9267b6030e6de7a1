"""The accumulators' update alone, by activation dtype: the same real activations in each, side by side.

    python bench/updates.py [--batches 12] [--batch-size 16] [--layers all] [--dtypes float32,bfloat16]
                            [--device auto] [--backend auto] [--parts] [--against REV]

The harvest's bookkeeping should cost no more in bfloat16 than in float32: a model run in bfloat16 hands the
accumulators half the bytes. This captures the embedded model's MLP activations (the neurons' values, float32)
for --batches batches of the embedded corpus, converts them once to each dtype, then times every layer's update
on each batch in each dtype in turn (the first dtype alternating), so drift in machine speed hits all alike. The
forward pass is not timed: bench/harvest.py times the harvest against it. Prints tokens/s per dtype and each
dtype's rate against the first's, over all batches and over the second half (the lists mostly settled). With
--against REV, a git revision's accumulators update the same activations too, in turns with the working tree's;
with --parts, each native loop's calls are timed as well.
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from harvest_ab import import_revision  # bench/ is on sys.path when a script in it runs

from featureatlas.allocator import keep_freed_memory
from featureatlas.harvest import accumulators as accumulators_module
from featureatlas.harvest import native
from featureatlas.harvest.accumulators import Backend, Settings, choose_backend
from featureatlas.harvest.batchview import BatchView
from featureatlas.harvest.contexts import iter_batches, iter_contexts
from featureatlas.harvest.run import HarvestConfig
from featureatlas.harvest.sources import parse_layers
from featureatlas.load.corpus import embedded_corpus, iter_documents
from featureatlas.load.models import load_model, pick_device, resolve_model

DEFAULTS = HarvestConfig(model="", corpus="", out="")  # the harvest's own defaults


def main() -> None:
    keep_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context-length", type=int, default=DEFAULTS.context_length)
    ap.add_argument("--layers", default="all", help="MLP neurons of these layers")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto", choices=["auto"] + [b.value for b in Backend])
    ap.add_argument("--against", metavar="REV", help="also time a git revision's accumulators on the same "
                    "activations, in each dtype (imported as bench/harvest_ab.py does)")
    ap.add_argument("--parts", action="store_true",
                    help="also time each of the native loops' calls (the NATIVE backend), over the second half")
    args = ap.parse_args()
    device = pick_device(args.device)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    model, tokenizer = load_model(resolve_model(args.model), torch.device("cpu"), torch.float32)
    has_bos = tokenizer.bos_token_id is not None
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    contexts = iter_contexts(iter_documents(embedded_corpus()), tokenizer, args.context_length,
                             2 * args.batches * args.batch_size * args.context_length, lambda d: None)
    batches = [b for b, _ in iter_batches(contexts, args.batch_size, has_bos, 0) if not b.padded][: args.batches]

    captured = mlp_activations(model, layers, batches)
    del model
    acts = {dtype: [[a.to(device, dtype) for a in per_layer] for per_layer in captured] for dtype in dtypes}
    captured.clear()

    backend = choose_backend(device) if args.backend == "auto" else Backend(args.backend)
    units = acts[dtypes[0]][0][0].shape[-1]
    sources = [SimpleNamespace(n_units=units, signed=True, sparse=False) for _ in layers]
    codes = {"": accumulators_module}
    with tempfile.TemporaryDirectory() as folder:
        if args.against:
            harvester, _ = import_revision(args.against, Path(folder))
            codes[f" {args.against}"] = importlib.import_module(harvester.__name__.replace("harvester",
                                                                                            "accumulators"))
        accumulators = {}  # variant: a dtype, and the revision's code where one is compared
        for suffix, code in codes.items():
            settings = code.Settings(backend=code.Backend(backend.value))
            for dtype in dtypes:
                accumulators[f"{str(dtype).removeprefix('torch.')}{suffix}"] = (dtype, code.make_accumulators(
                    sources, settings, args.context_length, device, [dtype] * len(layers)))
        seed = Settings().seed
        views = [BatchView.of(batch, int(has_bos), seed, device) for batch in batches]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        parts: dict[str, dict[str, float]] = {variant: {} for variant in accumulators}
        timing: list = [None]  # the variant whose parts are timed now, or None
        if args.parts:
            for name in ("reduce", "reduce_and_gather", "topk_update", "reservoir_update", "histogram_update"):
                if hasattr(native, name):
                    setattr(native, name, timed(getattr(native, name), name, parts, timing))

        def update(variant: str, i: int) -> float:
            dtype, accs = accumulators[variant]
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                for acc, layer_acts in zip(accs, acts[dtype][i], strict=True):
                    acc.update(layer_acts, views[i])
            sync()
            return time.perf_counter() - start

        variants = list(accumulators)
        times: dict[str, list[float]] = {variant: [] for variant in variants}
        for i in range(len(batches)):
            for variant in variants if i % 2 == 0 else variants[::-1]:
                timing[0] = variant if i >= len(batches) // 2 and not variant.endswith(f" {args.against}") else None
                times[variant].append(update(variant, i))
    tokens = batches[0].input_ids.numel()
    print(f"{device}, backend {backend.value}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}: {len(batches)} batches of {args.batch_size}x{args.context_length} tokens, "
          f"{units * len(layers):,} neurons ({len(layers)} layers), updates only")
    half = len(batches) // 2
    for label, part in (("all batches", slice(None)), (f"last {len(batches) - half}", slice(half, None))):
        rates = {variant: tokens * len(times[variant][part]) / sum(times[variant][part]) for variant in variants}
        first = rates[variants[0]]
        print(f"{label:>12}: " + " | ".join(f"{variant} {r:8.0f} tok/s ({r / first:.3f})"
                                            for variant, r in rates.items()))
    calls = (len(batches) - half) * len(layers)
    for variant in variants if args.parts else []:
        if parts[variant]:
            total = sum(times[variant][half:]) * 1000 / calls
            print(f"{variant:>12}: ms a layer and batch, last {len(batches) - half}: all {total:.2f} | " + " | ".join(
                f"{name} {seconds * 1000 / calls:.2f}" for name, seconds in
                sorted(parts[variant].items(), key=lambda item: -item[1])))


def timed(function: Callable, name: str, parts: dict, timing: list) -> Callable:
    """function, its time added to parts[dtype][name] while timing[0] names a dtype."""
    def call(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            if timing[0] is not None:
                into = parts[timing[0]]
                into[name] = into.get(name, 0.0) + time.perf_counter() - start
    return call


def mlp_activations(model: torch.nn.Module, layers: list[int], batches: list) -> list[list[torch.Tensor]]:
    """[batch][layer]: the input of each layer's down projection (the neurons' activations), in float32."""
    captured: list[list[torch.Tensor]] = []
    hooks = [model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda _module, inputs: captured[-1].append(inputs[0].detach().clone())) for layer in layers]
    with torch.inference_mode():
        for batch in batches:
            captured.append([])
            model.model(input_ids=batch.input_ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return captured


if __name__ == "__main__":
    main()
