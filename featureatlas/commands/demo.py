"""`featureatlas demo`: the embedded model end to end. SmolLM2-135M-Instruct over Shakespeare; a top-k SAE on one
layer's residual stream and a top-k transcoder of the same layer's MLP, trained on it; neurons, residual dimensions,
attention heads of a few layers and both dictionaries' features harvested into one store, with neighbours and a map
of each dictionary; a few SAE features explained and scored by the same model; the site built from it. The model
loads once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from featureatlas.commands import options
from featureatlas.settings import setting

NAME = "demo"
DEMO_TOKENS = 60_000
DEMO_SAE_STEPS = 80  # about a minute on 2 CPU cores; the loss has flattened by then
DEMO_HEADS = "0,8,15"  # attention heads of a few layers, with where each looked
# Short answers and few held-out examples: a 135M model on a CPU writes some 10 tokens a second.
DEMO_EXPLAIN = {"examples": 10, "test_examples": 6, "batch": 6, "max_tokens": 60}
# The harvest settings a demo does not take: it reads the embedded corpus into one store of its own.
NOT_FOR_DEMO = (*options.SHARED, "shard", "checkpoint_every", "resume")


@dataclass
class DemoSettings:
    """Where the demo writes, and the layer its dictionaries are trained on."""

    out: Path = setting(Path("demo"), "folder for store.duckdb and site/")
    sae_layer: int = setting(15, "the demo trains its SAE on this layer's hook_resid_post and its transcoder on this "
                                 "layer's MLP")
    explain: int = setting(3, "SAE features to explain and score with the embedded model (a 135M model: read its "
                              "explanations as a demonstration; docs/explain.md)", metavar="N")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser(NAME, help="harvest the embedded model over the embedded corpus and build the site",
                          description="The embedded default end to end: SmolLM2-135M-Instruct over Shakespeare "
                                      "(Project Gutenberg texts from the `shakespeare` package) → a top-k SAE and "
                                      "a top-k transcoder trained on it → neurons, residual dimensions, attention "
                                      "heads, SAE and transcoder features harvested into one store → a few SAE "
                                      "features explained and scored → site.")


def add_options(parser: argparse.ArgumentParser) -> None:
    from featureatlas.harvest.config import HarvestConfig, TrainSaeConfig

    options.add_settings(parser, DemoSettings, ["out"])
    options.add_settings(parser, HarvestConfig, skip=NOT_FOR_DEMO,
                         defaults={"tokens": DEMO_TOKENS, "resid": "all", "heads": DEMO_HEADS})
    options.add_settings(parser, DemoSettings, ["sae_layer", "explain"])
    options.add_settings(parser, TrainSaeConfig, ["features", "k", "tokens", "steps"], prefix="sae_",
                         help_prefix="the SAE's and the transcoder's ", defaults={"steps": DEMO_SAE_STEPS})
    options.add_model(parser, HarvestConfig, names=("device", "dtype"), cache=True)


def run(args: argparse.Namespace) -> int:
    from featureatlas.commands.build import build_and_report
    from featureatlas.commands.harvest import harvest_and_report
    from featureatlas.commands.train_sae import train_and_report
    from featureatlas.harvest.config import HarvestConfig, TrainSaeConfig
    from featureatlas.load.architectures import architecture_of
    from featureatlas.load.corpus import embedded_corpus
    from featureatlas.load.models import EMBEDDED_MODEL, load_model, pick_device, pick_dtype, resolve_model

    args.out.mkdir(parents=True, exist_ok=True)
    device = pick_device(args.device)
    ref = resolve_model(EMBEDDED_MODEL)
    model, tokenizer = load_model(ref, device, pick_dtype(args.dtype, device))
    loaded = (model, tokenizer, ref)
    layer = args.sae_layer
    arch = architecture_of(model.config.model_type)
    trained = {}
    for name, hook, transcode in ((f"res{layer}", f"blocks.{layer}.hook_resid_post", False),
                                  (f"mlp{layer}", f"{arch.blocks}.{layer}.{arch.mlp}", True)):  # as sparsify names it
        out = args.out / "transcoder" if transcode else args.out / "sae" / hook
        trained[name] = train_and_report(TrainSaeConfig(
            hook=hook, corpus=embedded_corpus(), out=out, model=EMBEDDED_MODEL, transcode=transcode,
            features=args.sae_features, k=args.sae_k, tokens=args.sae_tokens, steps=args.sae_steps,
            context_length=args.context_length, seed=args.seed, overwrite=True), loaded)
    store = args.out / "store.duckdb"
    harvest_and_report(options.settings_from(args, HarvestConfig, model=EMBEDDED_MODEL, corpus=embedded_corpus(),
                                             out=store, saes=[f"{n}={folder}" for n, folder in trained.items()],
                                             overwrite=True), loaded)  # the demo remakes its own output
    if args.explain:
        from featureatlas.explain.client import LocalClient
        from featureatlas.explain.run import ExplainConfig, explain_store

        explainer = LocalClient(EMBEDDED_MODEL, loaded=loaded)
        print(explain_store(ExplainConfig(store=store, source=f"sae:res{layer}", limit=args.explain, seed=args.seed,
                                          **DEMO_EXPLAIN), explainer=explainer, scorer=explainer).line())
    summary = build_and_report(store, args.out / "site")
    print(f"\nOpen file://{summary.index.resolve()}\nor run: featureatlas serve {args.out / 'site'} --store {store}"
          "   (every unit page can then probe your text, steer and ablate)")
    return 0
