"""`featureatlas explain`: explanations of units written from their stored examples by a local model or an
OpenAI-compatible endpoint, scored by detection and fuzzing, added to the store (explain/run.py)."""

from __future__ import annotations

import argparse

from featureatlas.commands import options

NAME = "explain"
EPILOG = """\
examples:
  featureatlas explain atlas.duckdb --units mlp/12/345,sae:res15/123           # the embedded SmolLM2-135M
  featureatlas explain atlas.duckdb --source sae:res15 --limit 50 \\
      --explainer http://localhost:8000/v1                                     # vLLM (its only model)
  featureatlas explain atlas.duckdb --units L3N7 --explainer http://localhost:11434/v1 \\
      --explainer-model llama3.1:8b                                            # Ollama
  OPENAI_API_KEY=... featureatlas explain atlas.duckdb --source mlp --layer 12 --limit 20 \\
      --explainer https://api.openai.com/v1 --explainer-model gpt-4o-mini

Each unit gets its explanation twice in the `explanations` view, with score_kind 'detection balanced accuracy'
and 'fuzzing balanced accuracy' (1.0 perfect, 0.5 chance); with --score off once, unscored. Endpoint answers are
cached, so a re-run (or a run stopped by an error) resumes for free. docs/explain.md says what the scores mean,
what a run costs and how far to trust the embedded 135M explainer.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `explain` subcommand with its help; add_options adds its options."""
    return sub.add_parser(NAME, help="write and score explanations of units with a local model or an "
                                     "OpenAI-compatible endpoint",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                          description="Write an explanation of each unit from its top examples (activating tokens\n"
                                      "marked), with a local transformers model or any OpenAI-compatible chat\n"
                                      "endpoint (vLLM, llama.cpp's server, Ollama, a hosted API), score it by\n"
                                      "detection and fuzzing as EleutherAI's delphi defines them (held-out examples\n"
                                      "across the unit's quantiles against non-activating text; balanced accuracy),\n"
                                      "and add the results to the store's `explanations` view, all or none, for\n"
                                      "the site to show.")


def add_options(parser: argparse.ArgumentParser) -> None:
    """The options, made from ExplainConfig's fields (explain/run.py imports torch: only for this command)."""
    from featureatlas.explain.run import ExplainConfig

    options.add_settings(parser, ExplainConfig, ["store", "units", "source", "layer", "limit"], positional=["store"])
    options.add_settings(parser, ExplainConfig, ["explainer", "explainer_model", "scorer", "scorer_model", "score",
                                                 "api_key_env", "max_tokens", "concurrency", "retries", "timeout",
                                                 "cache"], group="explainer and scorer")
    options.add_settings(parser, ExplainConfig, ["examples", "test_examples", "window", "highlight", "batch",
                                                 "seed"], group="examples shown and held out")
    options.add_model(parser, ExplainConfig, names=("device", "dtype"), cache=True)


def run(args: argparse.Namespace) -> int:
    """Explain, score and store; prints a line per unit and a summary."""
    from featureatlas.explain.run import ExplainConfig, explain_store

    summary = explain_store(options.settings_from(args, ExplainConfig))
    print(summary.line())
    return 0
