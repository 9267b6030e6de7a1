"""`featureatlas info`: say what a store holds."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from featureatlas.commands import options
from featureatlas.settings import setting

NAME = "info"


@dataclass
class InfoSettings:
    store: Path = setting(help=options.STORE_HELP)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser(NAME, help="say what a store holds", description="Summarise a store: runs, sources, counts.")


def add_options(parser: argparse.ArgumentParser) -> None:
    options.add_settings(parser, InfoSettings, positional=["store"])


def run(args: argparse.Namespace) -> int:
    from featureatlas.store.info import describe

    print(describe(options.settings_from(args, InfoSettings).store))
    return 0
