"""Unit pages: statistics, histogram, logit effects and every kind of example of one unit.

The repeated parts (examples, bars, logit rows) are formatted here rather than in Jinja loops: a layer has
tens of thousands of them. The template holds the page's structure.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
from markupsafe import Markup

from featureatlas.build.examples import SpanTails, example_blocks, render_examples
from featureatlas.build.histogram import histogram_svg
from featureatlas.build.numbers import format_activation, format_one_in, format_percent
from featureatlas.build.reader import EXAMPLE_KINDS, LayerInfo, Logits, UnitChunk
from featureatlas.build.tokens import token_html

NOUNS = {"mlp": "Neuron", "resid": "Dimension", "sae": "Feature", "transcoder": "Feature"}
TOP, BOTTOM, QUANTILE, RANDOM = range(len(EXAMPLE_KINDS))


def noun(info: LayerInfo) -> str:
    """What a unit of this source is called: Neuron, Dimension, Feature."""
    return NOUNS.get(info.kind or "", "Unit")


@dataclass
class PageContext:
    """What every unit page of one layer shares."""

    info: LayerInfo
    root: str  # relative path from a unit page back to the site root
    bos_token: str | None
    model_anchor: str  # the model's id on the index page


@functools.lru_cache(maxsize=65536)
def token_chip(token: str | None, token_id: int) -> str:
    """A vocabulary token as in the contexts (glyphs for whitespace, escapes for controls), on one line."""
    if token is None:
        return f'<span class="muted">id {token_id}</span>'
    return f'<span class="tok">{token_html(token).replace(chr(10), "")}</span>'


def _logit_table(caption: str, logits: Logits, rows: range) -> str:
    body = "".join(f"<tr><td>{token_chip(logits.token[i], int(logits.token_id[i]))}</td>"
                   f"<td>{logits.effect[i]:+.3g}</td></tr>" for i in rows)
    return (f'<table class="lt"><caption>{caption}</caption><thead><tr><th scope="col">Token</th>'
            f'<th scope="col">Effect</th></tr></thead><tbody>{body}</tbody></table>')


def logit_tables(logits: Logits, lo: int, hi: int) -> str:
    """Promoted and suppressed tokens of one unit (rows [lo, hi) of the chunk's logits), or '' if none."""
    if hi == lo:
        return ""
    split = lo + int(np.searchsorted(logits.bottom[lo:hi], True))
    return _logit_table("Promoted", logits, range(lo, split)) + _logit_table("Suppressed", logits, range(split, hi))


def _interval_heading(lo: float, hi: float, unit_max: float, n: int) -> str:
    """'2.62 to 5.24', then where that lies relative to the unit's max and how many examples it holds."""
    share = f"{100 * lo / unit_max:.0f}\u2013{100 * hi / unit_max:.0f}% of max \u00b7 " if unit_max > 0 else ""
    plural = "" if n == 1 else "s"
    return (f'<h3>{format_activation(lo)} to {format_activation(hi)} '
            f'<span class="count">{share}{n} example{plural}</span></h3>')


def _quantile_groups(blocks: list[str], lo: np.ndarray, hi: np.ndarray, first: int, stop: int,
                     unit_max: float) -> str:
    """Quantile examples [first, stop) grouped by interval (they arrive sorted, highest interval first)."""
    groups, start = [], first
    for i in range(first + 1, stop + 1):
        if i == stop or lo[i] != lo[start] or hi[i] != hi[start]:
            groups.append(f'<section class="interval">{_interval_heading(lo[start], hi[start], unit_max, i - start)}'
                          f'{"".join(blocks[start:i])}</section>')
            start = i
    return "".join(groups)


_SECTIONS = {  # id, heading, what the section shows
    TOP: ("top", "Top activations", "The contexts whose max activation is highest, around their max token."),
    BOTTOM: ("bottom", "Bottom activations", "The contexts whose min activation is lowest, around their min token; "
                                             "blue is scaled to the unit's min."),
    QUANTILE: ("quantiles", "Quantile intervals",
               "Contexts sampled by the interval their max falls in, highest first, around their max token."),
    RANDOM: ("random", "Random sample", "Contexts where the unit fires, at random, around their max token."),
}


def _absent(kind: int, n_tokens: int, n_firing: int, noun: str) -> str:
    """Why a section has no examples, in a few words."""
    if n_tokens == 0:
        return f"No examples: this {noun} was never seen in the harvest."
    if n_firing == 0 and kind != BOTTOM:
        return f"No examples: this {noun} never fired."
    return "None in this store."


def example_sections(chunk: UnitChunk, blocks: list[str], lo: int, hi: int, i: int, info: LayerInfo) -> list[dict]:
    """The example sections of unit i (its examples are rows [lo, hi) of the chunk's), in page order. Each
    says what its colours are relative to (site.js reads it for the tooltip): the max, or the min for bottom."""
    examples, stats = chunk.examples, chunk.stats
    bounds = (lo + np.searchsorted(examples.kind[lo:hi], np.arange(len(EXAMPLE_KINDS) + 1))).tolist()
    unit_max = float(stats.max[i])
    sections = []
    for kind, (anchor, title, note) in _SECTIONS.items():
        if kind == BOTTOM and not info.signed:
            continue
        first, stop = bounds[kind], bounds[kind + 1]
        if kind == QUANTILE:
            html = _quantile_groups(blocks, examples.interval_lo, examples.interval_hi, first, stop, unit_max)
        else:
            html = "".join(blocks[first:stop])
        relative_to = "min" if kind == BOTTOM else "max"
        sections.append({"id": anchor, "title": title, "note": note, "n": stop - first, "html": Markup(html),
                         "relative_to": relative_to, "scale": format_activation(getattr(stats, relative_to)[i]),
                         "absent": _absent(kind, int(stats.n_tokens[i]), int(stats.n_firing[i]), noun(info).lower())})
    return sections


def unit_facts(chunk: UnitChunk, i: int) -> dict[str, str]:
    """The statistics a person reads first, formatted."""
    s = chunk.stats
    seen = s.n_tokens[i] > 0
    return {"max": format_activation(s.max[i]), "min": format_activation(s.min[i]),
            "percent": format_percent(s.frequency[i]), "one_in": format_one_in(s.frequency[i]),
            "mean": format_activation(s.mean[i] if seen else None),
            "std": format_activation(s.std[i] if seen else None), "n_tokens": f"{int(s.n_tokens[i]):,}"}


def _bounds(sorted_units: np.ndarray, units: np.ndarray) -> list[int]:
    """Row boundaries per unit in an array sorted by unit: unit j's rows are [b[j], b[j + 1])."""
    return np.searchsorted(sorted_units, np.append(units, units[-1] + 1 if len(units) else 0)).tolist()


def write_unit_pages(chunk: UnitChunk, page: PageContext, template: jinja2.Template, tails: SpanTails,
                     folder: Path) -> tuple[int, int]:
    """Write units [chunk.first, chunk.stop) of a layer as `<unit>.html`; returns (pages, bytes)."""
    info, stats = page.info, chunk.stats
    htmls, acts = render_examples(chunk.examples, stats, tails, page.bos_token)
    blocks = example_blocks(chunk.examples, htmls, acts, page.bos_token)
    units = stats.units.tolist()
    chunk_units = stats.units[chunk.first:chunk.stop]
    ex_bounds = _bounds(chunk.examples.unit, chunk_units)
    hist_bounds = _bounds(chunk.histograms.unit, chunk_units)
    logit_bounds = _bounds(chunk.logits.unit, chunk_units)
    bins, counts = chunk.histograms.bin, chunk.histograms.count
    written = 0
    for j, i in enumerate(range(chunk.first, chunk.stop)):
        unit = units[i]
        h0, h1 = hist_bounds[j], hist_bounds[j + 1]
        histogram = histogram_svg(bins[h0:h1], counts[h0:h1], info.histogram_every) if h1 > h0 else ""
        logits = logit_tables(chunk.logits, logit_bounds[j], logit_bounds[j + 1])
        html = template.render(
            root=page.root, info=info, unit=unit, noun=noun(info), model_anchor=page.model_anchor,
            facts=unit_facts(chunk, i), seen=bool(stats.n_tokens[i] > 0), histogram=Markup(histogram),
            logits=Markup(logits), sections=example_sections(chunk, blocks, ex_bounds[j], ex_bounds[j + 1], i, info),
            prev=units[i - 1] if i > 0 else None, next=units[i + 1] if i + 1 < len(units) else None,
        )
        data = html.encode("utf-8")
        (folder / f"{unit}.html").write_bytes(data)
        written += len(data)
    return chunk.stop - chunk.first, written
