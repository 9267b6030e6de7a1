"""The accumulators' update alone, by activation dtype: the same real activations in each, side by side.

    python bench/updates.py [--batches 12] [--batch-size 16] [--layers all] [--dtypes float32,bfloat16]
                            [--device auto] [--backend auto]

The harvest's bookkeeping should cost no more in bfloat16 than in float32: a model run in bfloat16 hands the
accumulators half the bytes. This captures the embedded model's MLP activations (the neurons' values, float32)
for --batches batches of the embedded corpus, converts them once to each dtype, then times every layer's update
on each batch in each dtype in turn (the first dtype alternating), so drift in machine speed hits all alike. The
forward pass is not timed: bench/harvest.py times the harvest against it. Prints tokens/s per dtype and each
dtype's rate against the first's, over all batches and over the second half (the lists mostly settled).
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace

import torch

from featureatlas.allocator import keep_freed_memory
from featureatlas.harvest.accumulators import Backend, Settings, choose_backend, make_accumulators
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
    settings = Settings(backend=backend)
    units = acts[dtypes[0]][0][0].shape[-1]
    sources = [SimpleNamespace(n_units=units, signed=True, sparse=False) for _ in layers]
    accumulators = {dtype: make_accumulators(sources, settings, args.context_length, device, [dtype] * len(layers))
                    for dtype in dtypes}  # type: ignore[arg-type]
    views = [BatchView.of(batch, int(has_bos), settings.seed, device) for batch in batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def update(dtype: torch.dtype, i: int) -> float:
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            for acc, layer_acts in zip(accumulators[dtype], acts[dtype][i], strict=True):
                acc.update(layer_acts, views[i])
        sync()
        return time.perf_counter() - start

    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in dtypes}
    for i in range(len(batches)):
        for dtype in dtypes if i % 2 == 0 else dtypes[::-1]:
            times[dtype].append(update(dtype, i))
    tokens = batches[0].input_ids.numel()
    print(f"{device}, backend {backend.value}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}: {len(batches)} batches of {args.batch_size}x{args.context_length} tokens, "
          f"{units * len(layers):,} neurons ({len(layers)} layers), updates only")
    half = len(batches) // 2
    for label, part in (("all batches", slice(None)), (f"last {len(batches) - half}", slice(half, None))):
        rates = {dtype: tokens * len(times[dtype][part]) / sum(times[dtype][part]) for dtype in dtypes}
        first = rates[dtypes[0]]
        print(f"{label:>12}: " + " | ".join(f"{str(d).removeprefix('torch.')} {r:8.0f} tok/s ({r / first:.3f})"
                                            for d, r in rates.items()))


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
