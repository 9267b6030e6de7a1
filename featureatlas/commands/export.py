"""`featureatlas export`: write a store's units as JSON files, or as a Neuronpedia upload."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from featureatlas.commands import options
from featureatlas.settings import setting

NAME = "export"
EPILOG = """\
examples:
  featureatlas export atlas.duckdb --out atlas-json                   # every unit, one JSON file each
  featureatlas export atlas.duckdb --out l12 --source mlp --layers 12,14-15
  featureatlas export atlas.duckdb --format neuronpedia --out np --source sae:res15 \\
      --neuronpedia-model-id smollm2-135m-instruct --neuronpedia-set res-topk-4k

docs/exports-and-annotations.md says what each file holds and what the Neuronpedia rows approximate or leave empty.
"""


@dataclass
class ExportSettings:
    """The command's settings, named as export_store()'s parameters."""

    store: Path = setting(help=options.STORE_HELP)
    out: Path = setting(help="folder to write (refused if it exists, see --overwrite)")
    fmt: str = setting("json", "what to write (see above)", flag="--format", choices=("json", "neuronpedia"))
    sources: list[str] | None = setting(None, "export only this source (mlp, resid, sae:NAME, transcoder:NAME); "
                                              "repeatable", shown="all", flag="--source", metavar="SOURCE")
    layers: str | None = setting(None, "export only these layers, e.g. 0,3-5", shown="all")
    overwrite: bool = setting(False, "replace an existing --out that is an earlier export (or empty), atomically")
    batch_size: int | None = setting(None, "neuronpedia: features per batch file", shown="128", metavar="N")
    model_id: str | None = setting(None, "neuronpedia: the model id", shown="the store's model name, lowercased, "
                                   "other characters than letters, digits, _ and - as -",
                                   flag="--neuronpedia-model-id", metavar="ID")
    set_name: str | None = setting(None, "neuronpedia: the source set name, for an export of one source",
                                   shown="the source's name made safe the same way, e.g. sae:res15 -> sae-res15",
                                   flag="--neuronpedia-set", metavar="SET")
    creator_id: str | None = setting(None, "neuronpedia: the Neuronpedia user id to write as creatorId/authorId",
                                     shown="null", flag="--neuronpedia-creator-id", metavar="ID")
    workers: int | None = setting(None, "threads", shown="all cores, at most 8", metavar="N")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser(NAME, help="write a store's units as JSON files or as a Neuronpedia upload",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                          description="Write what the store holds about each unit (statistics, histogram, logit\n"
                                      "effects, examples with per-token activations, explanations) for other tools:\n"
                                      "  json         one file per unit, <model>/<source>/<layer>/<unit>.json, and\n"
                                      "               index.json (models, sources, layers, unit counts, runs)\n"
                                      "  neuronpedia  per source and layer, <model id>/<layer>-<set>/ with the\n"
                                      "               release/model/sourceset/source rows and gzipped JSONL batches\n"
                                      "               of features, activations and explanations, as SAEDashboard\n"
                                      "               writes them for Neuronpedia's import\n"
                                      "The folder is written beside --out and renamed into place when complete.")


def add_options(parser: argparse.ArgumentParser) -> None:
    options.add_settings(parser, ExportSettings, positional=["store"])


def run(args: argparse.Namespace) -> int:
    from featureatlas.export.common import export_store

    s = options.settings_from(args, ExportSettings)
    summary = export_store(s.store, s.out, s.fmt, sources=s.sources, layers=s.layers, overwrite=s.overwrite,
                           workers=s.workers, batch_size=s.batch_size, model_id=s.model_id, set_name=s.set_name,
                           creator_id=s.creator_id)
    print(f"exported {summary.units:,} units in {summary.files:,} files ({summary.bytes / 1e6:.1f} MB) in "
          f"{summary.seconds:.1f}s ({summary.units_per_second:,.0f} units/s) -> {summary.out}")
    return 0
