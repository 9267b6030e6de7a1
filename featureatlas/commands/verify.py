"""`featureatlas verify`: re-run a seeded sample of a store's examples through the model and compare."""

from __future__ import annotations

import argparse

from featureatlas.commands import options

NAME = "verify"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser(NAME, help="re-run a sample of a store's examples through the model and compare",
                          description="Re-run a seeded sample of a store's examples (evenly across sources, layers, "
                                      "example kinds and units) through the run's model and dictionaries, in the "
                                      "run's dtype and batch layout, and compare the stored per-token activations, "
                                      "max positions and values with the recomputed ones; also checks every unit's "
                                      "n_tokens. Exit status 1 on any mismatch. What is checked and the tolerance: "
                                      "docs/large-runs.md#verify.")


def add_options(parser: argparse.ArgumentParser) -> None:
    from featureatlas.harvest.config import VerifyConfig

    options.add_settings(parser, VerifyConfig, ["store", "sample", "seed", "rtol"], positional=["store"])
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON instead")
    options.add_model(parser, VerifyConfig)


def run(args: argparse.Namespace) -> int:
    from featureatlas.harvest.config import VerifyConfig
    from featureatlas.harvest.verify import verify

    report = verify(options.settings_from(args, VerifyConfig))
    if args.json:
        print(report.to_json())
    else:
        print(report.summary())
        if not report.ok:
            print(report.table())
    return 0 if report.ok else 1
