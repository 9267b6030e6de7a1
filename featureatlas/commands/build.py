"""`featureatlas build`: render the static site from a store."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from featureatlas.commands import options
from featureatlas.settings import setting

if TYPE_CHECKING:
    from featureatlas.build.site import BuildSummary

NAME = "build"


@dataclass
class BuildSettings:
    """The command's settings, named as build_site's parameters."""

    store: Path = setting(help=options.STORE_HELP)
    out: Path = setting(help="site folder to write (replaced if it is a previous site)")
    workers: int | None = setting(None, "processes", shown="all cores")
    incremental: bool = setting(False, "re-render only the layers whose data changed since the site in --out was "
                                       "built (after annotate, or a new source); the rest is linked from it")
    full_paths: bool = setting(False, "show the corpus, model and dictionary paths in full (default: their last "
                                      "part only, so a public site does not reveal the building machine's folders)")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser(NAME, help="render a static site from a store",
                          description="Render a static website from a store: an index, a page per layer listing its "
                                      "units, a page per unit drawn from data shards, and search. Publishable as-is "
                                      "on GitHub, GitLab or Cloudflare Pages, and browsable from file://.")


def add_options(parser: argparse.ArgumentParser) -> None:
    options.add_settings(parser, BuildSettings, positional=["store"])


def run(args: argparse.Namespace) -> int:
    s = options.settings_from(args, BuildSettings)
    build_and_report(s.store, s.out, s.workers, s.full_paths, s.incremental)
    return 0


def build_and_report(store: Path, out: Path, workers: int | None = None, full_paths: bool = False,
                     incremental: bool = False) -> BuildSummary:
    """Build the site and print the summary line."""
    from featureatlas.build.site import build_site

    summary = build_site(store, out, workers=workers, full_paths=full_paths, incremental=incremental)
    reused = f", {summary.reused_units:,} unchanged" if incremental else ""
    print(f"rendered {summary.units:,} units{reused}: {summary.files:,} files ({summary.bytes / 1e6:.1f} MB) in "
          f"{summary.seconds:.0f}s ({summary.units_per_second:,.0f} units/s) -> {summary.index}")
    return summary
