"""`featureatlas annotate`: add explanations of units (csv, jsonl, delphi, Neuronpedia) to a store."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from featureatlas.commands import options
from featureatlas.settings import setting

NAME = "annotate"
EPILOG = """\
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


@dataclass
class AnnotateSettings:
    """The command's settings, named as annotate()'s parameters."""

    store: Path = setting(help="the store to add to (a .duckdb file written by harvest)")
    explanations: Path = setting(help="the file, or delphi folder, to load", metavar="FILE")
    author: str | None = setting(None, "record NAME as every row's author (default: the input's author column, "
                                       "delphi's explainer model, Neuronpedia's explanationModelName)", metavar="NAME")
    sources: list[str] = setting(help="SOURCE: the source of rows that name none (e.g. every delphi module or "
                                      "Neuronpedia layer); NAME=SOURCE: maps a delphi module (layers.5), a Neuronpedia "
                                      "source (12-res-jb) or set (res-jb), or a source column's value onto a source "
                                      "of the store; repeatable. Without it delphi modules match dictionaries by "
                                      "hook, and Neuronpedia sources by the SAELens config's neuronpedia_id or by "
                                      "name", factory=list, flag="--source", metavar="SOURCE|NAME=SOURCE")
    model: str | None = setting(None, "the model of rows that name none, in a store holding several")
    replace: bool = setting(False, "first delete the explanations loaded earlier from a file (or delphi folder) of "
                                   "the same name")
    skip_unknown: bool = setting(False, "leave out (and count) rows of units the store does not hold, instead of "
                                        "stopping")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser(NAME, help="add explanations of units (csv, jsonl, delphi, Neuronpedia) to a store",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                          description="Add explanations of units (what a person or an explainer model says each\n"
                                      "responds to) to a store's `explanations` view, for the site to show. Reads\n"
                                      ".csv/.tsv and .jsonl/.json rows (columns: unit or address, text, and "
                                      "optionally\nscore, author), the per-latent files EleutherAI's delphi writes "
                                      "(its\nexplanations folder or run folder), and Neuronpedia's explanation "
                                      "exports\n(.json, .jsonl, .jsonl.gz, or a folder of them). All rows go in or "
                                      "none do;\nrows already in the store are skipped, so loading a file twice adds "
                                      "nothing.")


def add_options(parser: argparse.ArgumentParser) -> None:
    options.add_settings(parser, AnnotateSettings, positional=["store"])


def run(args: argparse.Namespace) -> int:
    from featureatlas.annotate.explanations import annotate

    s = options.settings_from(args, AnnotateSettings)
    summary = annotate(s.store, s.explanations, author=s.author, sources=s.sources, model=s.model,
                       replace=s.replace, skip_unknown=s.skip_unknown)
    print(summary.line())
    return 0
