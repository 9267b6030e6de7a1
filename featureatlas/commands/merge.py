"""`featureatlas merge`: merge shard stores exactly, or combine stores of other models or corpora into one."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from featureatlas.commands import options
from featureatlas.settings import setting

NAME = "merge"


@dataclass
class MergeSettings:
    """The command's settings: the stores to merge, and where to."""

    stores: list[Path] = setting(help="stores written by harvest (the shards of one run, or any stores)", nargs="+")
    out: Path = setting(help="the merged store (written atomically)")
    overwrite: bool = setting(False, "replace a store already at --out")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser(NAME, help="merge shard stores exactly, or combine catalogues into one store",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="Merge stores into one. Shards of one harvest (`harvest --shard I/N` jobs, e.g. "
                                      "a SLURM array)\nmerge exactly: the result equals one run over the whole "
                                      "corpus. Stores of other models,\ndictionaries or corpora are combined side by "
                                      "side. Stores holding the same units with\ndifferent options are refused, "
                                      "naming the difference.",
                          epilog="example:\n  featureatlas merge shard-*.duckdb --out atlas.duckdb")


def add_options(parser: argparse.ArgumentParser) -> None:
    options.add_settings(parser, MergeSettings, ["stores"], positional=["stores"])
    options.add_output(parser, MergeSettings)


def run(args: argparse.Namespace) -> int:
    from featureatlas.store.merge import merge_stores

    s = options.settings_from(args, MergeSettings)
    counts = merge_stores(s.stores, s.out, overwrite=s.overwrite)
    print(f"merged {len(s.stores)} stores into {counts['runs']} run(s), {counts['units']:,} units, "
          f"{counts['examples']:,} examples -> {s.out}")
    return 0
