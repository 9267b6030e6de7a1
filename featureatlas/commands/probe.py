"""`featureatlas probe`: a unit's activations on the user's own text, or the units that fire most on it.

On a terminal the tokens are shaded like the site's (ANSI 24-bit backgrounds, the site's buckets); piped, or with
--plain, every line is `token<TAB>activation` (`address<TAB>max<TAB>position<TAB>token` for --top), the token with
its invisible characters drawn as the site draws them, so no token can break a line or send the terminal a code.
"""

from __future__ import annotations

import argparse
import colorsys
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from featureatlas.commands import options
from featureatlas.errors import UsageError, setting_name
from featureatlas.settings import device_setting, dictionaries_setting, dtype_setting, model_setting, setting
from featureatlas.slugs import unique_slugs
from featureatlas.text import visible

if TYPE_CHECKING:
    import numpy as np

    from featureatlas.harvest.probe import TopUnit, UnitProbe

NAME = "probe"
BUCKETS = 9  # as tokens.js: a value's shade is round(value / scale * 9), clamped to -9..9
_RESET = "\x1b[0m"
_DIM = "\x1b[2m"


@dataclass
class ProbeArgs:
    """What to probe and with which model; each field's help is the command line's."""

    text: str = setting(help="the text to probe, or - to read it from stdin")
    unit: str | None = setting(None, "e.g. mlp/12/345, L12N345, sae:res15/123", metavar="ADDRESS")
    top: int | None = setting(None, "list the N units that fire most on the text", metavar="N")
    source: str = setting("mlp", "--top: mlp, resid, sae:NAME, transcoder:NAME")
    layer: int | None = setting(None, "--top: the layer (a source with one layer: optional)")
    model: str | None = model_setting("model folder, .gguf file, hub id or smollm2-135m; with --store: where the run's "
                                      "model is now", default=None)
    store: Path | None = setting(None, "take the model, dictionaries and dtype from this store's run (and shade to "
                                       "its units' max)")
    saes: list[str] = dictionaries_setting("a dictionary folder (source sae:NAME / transcoder:NAME); repeatable")
    site: Path | None = setting(None, "a built site: print each unit's page link")
    plain: bool = setting(False, "token<TAB>activation lines even on a terminal")
    device: str = device_setting()
    dtype: str = dtype_setting("without --store")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser(NAME, help="show what a unit does on your own text, or which units fire most on it",
                          description="Run a text through the model (only up to the deepest layer needed), as harvest "
                                      "runs a context (BOS first), and print a unit's activation on every token, "
                                      "shaded on a terminal (scaled to the unit's max in --store, else to the text's "
                                      "max), plain `token<TAB>activation` lines when piped or with --plain; or, with "
                                      "--top, the units of a source and layer with the largest max on the text.")


def add_options(parser: argparse.ArgumentParser) -> None:
    options.add_settings(parser, ProbeArgs, skip=options.MODEL, positional=["text"])
    options.add_model(parser, ProbeArgs, cache=True)


def run(args: argparse.Namespace) -> int:
    return probe_command(options.settings_from(args, ProbeArgs))


def read_text(text: str, stdin: TextIO | None = None) -> str:
    """The text argument, or stdin for '-' (one trailing newline dropped: `echo` adds it)."""
    from featureatlas.harvest.probe import MAX_CHARS, check_text

    if text != "-":
        return check_text(text)
    stream = stdin or sys.stdin
    try:
        data = stream.read(MAX_CHARS + 2)
    except UnicodeDecodeError as err:
        raise UsageError(f"stdin is not UTF-8 ({err.reason} at byte {err.start}); pass UTF-8 text") from None
    if data.endswith("\n"):
        data = data[:-1].removesuffix("\r")
    return check_text(data)


def probe_command(args: ProbeArgs, out: TextIO | None = None) -> int:
    """Everything checkable (text, addresses, store, site) is checked before the model loads."""
    from transformers.utils import logging as hf_logging

    from featureatlas.harvest.probe import load_prober, pick_source
    from featureatlas.store.addresses import AddressError, parse_address, store_sources

    out = out or sys.stdout
    unit, top = setting_name("unit"), setting_name("top")
    if (args.unit is None) == (args.top is None):
        raise UsageError(f"pass either {unit} ADDRESS or {top} N (with {setting_name('source')} and "
                         f"{setting_name('layer')})")
    if args.top is not None and args.top < 1:
        raise UsageError(f"{top} must be at least 1")
    if args.store is None and args.model is None:
        raise UsageError(f"pass {setting_name('model')} MODEL, or {setting_name('store')} STORE to take the model "
                         "from a store's run")
    if args.site is not None and not args.site.is_dir():
        raise UsageError(f"{args.site}: no such site folder; pass the folder `featureatlas build --out` wrote")
    text = read_text(args.text)
    model_name = None
    held = None
    if args.store is not None:
        from featureatlas.store.schema import open_store
        con = open_store(args.store)
        try:
            held = store_sources(con)
            models = sorted({s.model for s in held} | {m for (m,) in con.execute("SELECT model FROM runs").fetchall()})
        finally:
            con.close()
        if args.unit is not None:
            try:
                model_name = parse_address(args.unit, held)[0]
            except AddressError as err:
                raise UsageError(str(err)) from None
        elif len(models) > 1:
            raise UsageError(f"{args.store}: holds several models ({', '.join(models)}); {top} needs a store of one")
        else:
            pick_source(held, args.source, args.layer)
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise around one line of output
    try:
        prober = load_prober(args.model, args.saes, store=args.store, device=args.device, dtype=args.dtype,
                             model_name=model_name)
    finally:
        if progress:
            hf_logging.enable_progress_bar()
    if held is None:
        held, models = prober.source_layers(), [prober.model_name]
    color = not args.plain and out.isatty() and not os.environ.get("NO_COLOR")

    def link(model: str, source: str, layer: int, unit: int) -> str | None:
        if args.site is None:
            return None
        sources = sorted({s.source for s in held if s.model == model})
        folder = args.site / unique_slugs(models)[model] / unique_slugs(sources)[source] / str(layer)
        return f"{(folder / 'unit.html').resolve().as_uri()}#{unit}"

    if args.unit is not None:
        result = prober.unit(text, args.unit)
        url = link(result.model, result.source, result.layer, result.unit)
        (write_unit_color if color else write_unit_plain)(result, out, url)
    else:
        name, layer = prober.resolve_source(args.source, args.layer)
        ranked = prober.top(text, name, layer, args.top)
        n_units = prober.sources[name, layer].n_units
        links = [link(t.model, t.source, t.layer, t.unit) for t in ranked]
        (write_top_color if color else write_top_plain)(ranked, out, links, n_units)
    return 0


# -- plain -----------------------------------------------------------------------------------------------------

def number(value: float) -> str:
    """The shortest text that reads back as the same float32: plain output loses nothing."""
    import numpy as np

    return str(np.float32(value))


def write_unit_plain(result: UnitProbe, out: TextIO, url: str | None) -> None:
    for token, value in zip(result.tokens, result.activations, strict=True):
        out.write(f"{visible(token)}\t{number(value)}\n")
    if url:
        print(f"{result.address}: {url}", file=sys.stderr)  # stdout stays token lines only


def write_top_plain(ranked: list[TopUnit], out: TextIO, links: list[str | None], n_units: int) -> None:
    for t, url in zip(ranked, links, strict=True):
        cells = [t.address, number(t.max_activation), str(t.position), visible(t.token)] + ([url] if url else [])
        out.write("\t".join(cells) + "\n")


# -- terminal --------------------------------------------------------------------------------------------------

def _hsl(hue: float, saturation: float, lightness: float) -> str:
    r, g, b = colorsys.hls_to_rgb(hue / 360, lightness / 100, saturation / 100)
    return f"\x1b[48;2;{round(r * 255)};{round(g * 255)};{round(b * 255)}m\x1b[38;2;0;0;0m"


# The site's light-theme buckets (style.css .a1-.a9, .n1-.n9)
_POSITIVE = [_hsl(24, 100, 93 - 5 * i) for i in range(BUCKETS)]
_NEGATIVE = [_hsl(214, 90, light) for light in (94, 90, 86, 81, 77, 73, 69, 64, 60)]


def shade(value: float, scale: float) -> str:
    """The ANSI code for a value's bucket ('' for bucket 0, as the site leaves such tokens plain)."""
    import numpy as np

    if not scale > 0 or not np.isfinite(value):
        return ""
    bucket = max(-BUCKETS, min(BUCKETS, round(value / scale * BUCKETS)))
    return _POSITIVE[bucket - 1] if bucket > 0 else _NEGATIVE[-bucket - 1] if bucket < 0 else ""


def text_scale(activations: np.ndarray, first: int) -> float:
    """Without a store: the text's own max over counted tokens (its |min| when nothing is positive)."""
    counted = activations[first:]
    if not len(counted):
        return 0.0
    hi = float(counted.max())
    return hi if hi > 0 else float(-counted.min())


def _painted(token: str, code: str) -> str:
    shown = visible(token)
    return f"{code}{shown}{_RESET}" if code else shown


def write_unit_color(result: UnitProbe, out: TextIO, url: str | None) -> None:
    stored = result.scale is not None
    scale = result.scale if stored else text_scale(result.activations, result.first_counted)
    at = result.max_position
    out.write(f"{result.address} on {len(result.tokens) - result.first_counted:,} tokens: max "
              f"{result.max_activation:.4g} at {visible(result.tokens[at])!r} (position {at}); shades scaled to "
              f"{scale:.4g}, {'the unit' if stored else 'this text'}'s max\n\n")
    line = []
    for i, (token, value) in enumerate(zip(result.tokens, result.activations, strict=True)):
        if i < result.first_counted:
            line.append(f"{_DIM}{visible(token)}{_RESET}")
            continue
        line.append(_painted(token, shade(float(value), scale)) + ("\n" if "\n" in token else ""))
    out.write("".join(line).rstrip("\n") + "\n\n")
    width = min(24, max(len(visible(t)) for t in result.tokens))
    for i, (token, value) in enumerate(zip(result.tokens, result.activations, strict=True)):
        shown = visible(token)
        pad = " " * max(0, width - len(shown))
        code = _DIM if i < result.first_counted else shade(float(value), scale)
        out.write(f"{i:>5}  {code}{shown}{_RESET if code else ''}{pad}  {float(value):>10.4g}\n")
    if url:
        out.write(f"\n{url}\n")


def write_top_color(ranked: list[TopUnit], out: TextIO, links: list[str | None], n_units: int) -> None:
    if not ranked:
        return
    first = ranked[0]
    out.write(f"the {len(ranked)} of {n_units:,} units of {first.source} layer {first.layer} that fire most on "
              "the text:\n\n")
    rows = [(str(rank), t.address, f"{t.max_activation:.4g}", repr(visible(t.token)), str(t.position), url or "")
            for rank, (t, url) in enumerate(zip(ranked, links, strict=True), 1)]
    header = ("rank", "unit", "max", "token", "position", "page" if any(links) else "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {0, 2, 4}
    for row in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        out.write("  ".join(cells).rstrip() + "\n")

