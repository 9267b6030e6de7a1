"""The `featureatlas` command: harvest what every unit of a model responds to into a store, build its site, serve it.

Each command is a module of featureatlas/commands/ owning its options and its run function; this module assembles
them, dispatches, and turns an error a user can act on into one line on stderr and exit status 2. Only the chosen
command's options are built: they come from settings dataclasses whose modules may import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable

from featureatlas.allocator import keep_freed_memory
from featureatlas.commands import (
    annotate,
    build,
    demo,
    explain,
    export,
    harvest,
    info,
    merge,
    probe,
    serve,
    steer,
    train_sae,
    verify,
)
from featureatlas.commands.options import flags_of
from featureatlas.errors import FeatureAtlasError

MODULES = (demo, harvest, train_sae, build, serve, probe, steer, info, verify, merge, annotate, explain, export)
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {module.NAME: module.run for module in MODULES}


def parser(command: str | None = None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The whole command line, with the options of `command` only (None: of none, for the list of commands), and
    that command's own parser."""
    top = argparse.ArgumentParser(prog="featureatlas", description=__doc__.splitlines()[0] +
                                  " See docs/store.md for the store's SQL schema.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None
    for module in MODULES:
        command_parser = module.add_parser(sub)
        if module.NAME == command:
            module.add_options(command_parser)
            chosen = command_parser
    return top, chosen


def main(argv: list[str] | None = None) -> int:
    """Run the command line (argv: the arguments after the program's name); returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    top, chosen = parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = top.parse_args(argv)
    keep_freed_memory()
    try:
        with _model_cache(args):
            return COMMANDS[args.command](args)
    except FeatureAtlasError as err:
        flags = {} if chosen is None else flags_of(chosen)
        print(f"featureatlas {args.command}: error: {err.naming(flags.get)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"featureatlas {args.command}: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


def _model_cache(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """--no-model-cache, for the commands that load a model."""
    if not hasattr(args, "no_model_cache"):
        return contextlib.nullcontext()
    from featureatlas.load.models import model_cache_disabled

    return model_cache_disabled(args.no_model_cache)
