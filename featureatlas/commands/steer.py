"""`featureatlas steer`: push on one unit and print the model's continuation beside the unpushed one."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from featureatlas.commands import options
from featureatlas.errors import UsageError, setting_name
from featureatlas.settings import device_setting, dictionaries_setting, dtype_setting, model_setting, setting

NAME = "steer"


@dataclass
class SteerArgs:
    """What to push on, how hard, and with which model; each field's help is the command line's."""

    text: str = setting(help="the prompt to continue, or - to read it from stdin")
    unit: str = setting(None, "the unit to push on, e.g. mlp/12/345, resid/3/507, sae:res15/123", metavar="ADDRESS")
    strength: float | None = setting(None, "add S x the unit's direction at every position (a neuron: its "
                                           "row of the MLP output projection; a residual dimension: its basis "
                                           "vector; a feature: its decoder row)", metavar="S")
    clamp: float | None = setting(None, "instead set a dictionary feature's activation to VALUE at every position "
                                        "(encode, edit, decode, keeping the reconstruction error)", metavar="VALUE")
    max_new_tokens: int = setting(30, "tokens to generate", metavar="N")
    seed: int | None = setting(None, "sample with this seed (default: greedy), the same for both continuations")
    model: str | None = model_setting("model folder, .gguf file, hub id or smollm2-135m; with --store: where the run's "
                                      "model is now", default=None)
    store: Path | None = setting(None, "take the model, dictionaries and dtype from this store's run")
    saes: list[str] = dictionaries_setting("a dictionary folder (source sae:NAME / transcoder:NAME); repeatable")
    device: str = device_setting()
    dtype: str = dtype_setting("without --store")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser(NAME, help="push on a unit and compare the model's continuations",
                          description="Continue a prompt twice with the same decoding: as the model does, and with "
                                      "one unit pushed (--strength) or a dictionary feature clamped (--clamp) at "
                                      "every position, prompt and new tokens alike.")


def add_options(parser: argparse.ArgumentParser) -> None:
    options.add_settings(parser, SteerArgs, skip=options.MODEL, positional=["text"])
    options.add_model(parser, SteerArgs, cache=True)


def run(args: argparse.Namespace) -> int:
    from featureatlas.commands.probe import read_text
    from featureatlas.harvest.probe import load_prober
    from featureatlas.text import terminal_text

    a = options.settings_from(args, SteerArgs)
    if a.unit is None:
        raise UsageError(f"{setting_name('unit')}: name the unit to push on, e.g. mlp/12/345")
    if (a.strength is None) == (a.clamp is None):
        raise UsageError(f"pass one of {setting_name('strength')} S or {setting_name('clamp')} VALUE")
    text = read_text(a.text)
    prober = load_prober(a.model, a.saes, store=a.store, device=a.device, dtype=a.dtype)
    mode, value = ("add", a.strength) if a.clamp is None else ("clamp", a.clamp)
    result = prober.steer(text, a.unit, value, mode, a.max_new_tokens, a.seed)
    push = f"{a.unit} {'+' if value >= 0 else ''}{value:g}" if mode == "add" else f"{a.unit} clamped to {value:g}"
    print(f"prompt:    {terminal_text(text)}")
    print(f"unsteered: {terminal_text(result.unsteered)}")
    print(f"steered ({terminal_text(push)}): {terminal_text(result.steered)}")
    return 0
