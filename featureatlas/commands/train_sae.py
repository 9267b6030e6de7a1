"""`featureatlas train-sae`: train a top-k SAE (or transcoder) on a hook of a model and save it for `harvest --sae`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featureatlas.commands import options

if TYPE_CHECKING:
    from featureatlas.harvest.config import TrainSaeConfig

NAME = "train-sae"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    return sub.add_parser(NAME, help="train a top-k SAE (or transcoder) on a hook of a model and save it",
                          description="Collect a hook's activations over a corpus, train a top-k sparse autoencoder "
                                      "on them and write a folder SAELens loads (and `harvest --sae` reads). With "
                                      "--transcode, train a top-k transcoder of a module (its output predicted from "
                                      "its input) and write it as EleutherAI sparsify does. Reports variance "
                                      "unexplained, L0 and dead features on held-out tokens.")


def add_options(parser: argparse.ArgumentParser) -> None:
    from featureatlas.harvest.config import TrainSaeConfig

    options.add_model(parser, TrainSaeConfig, cache=True)
    options.add_corpus(parser, TrainSaeConfig)
    options.add_output(parser, TrainSaeConfig)
    options.add_settings(parser, TrainSaeConfig, skip=options.SHARED)


def run(args: argparse.Namespace) -> int:
    from featureatlas.harvest.config import TrainSaeConfig

    train_and_report(options.settings_from(args, TrainSaeConfig))
    return 0


def train_and_report(config: TrainSaeConfig, loaded: tuple | None = None) -> Path:
    """Train, print the held-out metrics and return the dictionary's folder. loaded: as train_sae() takes it."""
    from featureatlas.harvest.train import train_sae

    result, folder = train_sae(config, loaded)
    what, of = ("transcoder", f"{config.hook}'s output from its input") if config.transcode else ("SAE", config.hook)
    print(f"trained a top-{result.k} {what} with {config.features:,} features on {of} over {result.n_train:,} tokens "
          f"in {result.seconds:.0f}s: variance unexplained {result.fvu:.3f}, L0 {result.l0:.1f}, "
          f"dead {result.dead_fraction:.1%} (on {result.n_heldout:,} held-out tokens) -> {folder}")
    return folder
