"""`featureatlas harvest`: run a model over a corpus and write a store (under torchrun, one shard per rank, merged)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from featureatlas.commands import options

if TYPE_CHECKING:
    from featureatlas.harvest.config import HarvestConfig
    from featureatlas.harvest.run import HarvestSummary

NAME = "harvest"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    return sub.add_parser(NAME, help="run a model over a corpus and write a store",
                          description="Run a model over a corpus and record, for every MLP neuron, residual dimension "
                                      "and dictionary feature asked for, its examples, statistics and logit effects "
                                      "in a DuckDB store (written to a temporary file, renamed when complete).")


def add_options(parser: argparse.ArgumentParser) -> None:
    from featureatlas.harvest.config import HarvestConfig

    options.add_model(parser, HarvestConfig, cache=True)
    options.add_corpus(parser, HarvestConfig)
    options.add_output(parser, HarvestConfig)
    options.add_settings(parser, HarvestConfig, skip=options.SHARED)


def run(args: argparse.Namespace) -> int:
    from featureatlas.harvest.config import HarvestConfig

    harvest_and_report(options.settings_from(args, HarvestConfig))
    return 0


def harvest_and_report(config: HarvestConfig, loaded: tuple | None = None) -> HarvestSummary | None:
    """Harvest (under torchrun: this rank's shard, merged on rank 0) and print the summary line; None on the other
    ranks. loaded: a model already in memory, as harvest() takes it."""
    from featureatlas.harvest import run as harvest_run
    from featureatlas.harvest.distributed import harvest_distributed, launched_by_torchrun

    if launched_by_torchrun() and loaded is None:
        summary = harvest_distributed(config)
        if summary is None:  # not rank 0: rank 0 reports
            return None
    else:
        summary = harvest_run.harvest(config, loaded=loaded)
    print(f"harvested {summary.n_units:,} units over {summary.n_tokens:,} tokens ({summary.n_contexts:,} contexts) "
          f"in {summary.seconds:.0f}s, {summary.tokens_per_second:,.0f} tokens/s -> {summary.store}")
    return summary
