"""Unit pages: the hot path of a build, so per-token HTML is assembled with numpy and C-level joins.

Per token the markup is `<b class=a7>tok</b>`: `<b>` is a one-letter element that assistive technology does not
announce, 6 bytes a token shorter than `<span>` (`<i>` marks glyphs; style.css gives `<b>` normal weight). The
class is a bucket on a fixed scale relative to the unit's max activation (a1..a9 positive, n1..n9 negative, none
near zero). The activations go in one `data-acts` attribute per example, three characters a value (see
numbers.py), which site.js decodes for the tooltip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import pyarrow.compute as pc
from markupsafe import Markup, escape

from featureatlas.build.numbers import ACT_WIDTH, encode_activations, format_activation
from featureatlas.build.reader import UnitChunk
from featureatlas.build.tokens import token_html, visible

BUCKETS = 9
_FLAG_MAX = 1  # the example's max token: outlined and keyboard-focusable
_FLAG_BOS = 2  # the context's BOS token: dimmed
_STRIDE = 2 * BUCKETS + 1


def _span_openings() -> list[str]:
    """Every opening tag a token can get, indexed by flags * _STRIDE + bucket + BUCKETS."""
    openings = []
    for flags in range(4):
        for bucket in range(-BUCKETS, BUCKETS + 1):
            classes = [f"a{bucket}"] if bucket > 0 else [f"n{-bucket}"] if bucket < 0 else []
            classes += ["m"] if flags & _FLAG_MAX else []
            classes += ["bos"] if flags & _FLAG_BOS else []
            # Unquoted where it can be (valid HTML for a value without spaces or quotes): two bytes a token.
            attrs = f' class="{" ".join(classes)}"' if len(classes) > 1 else f" class={classes[0]}" if classes else ""
            attrs += " tabindex=0" if flags & _FLAG_MAX else ""
            openings.append(f"<b{attrs}>")
    return openings


_OPENINGS = np.array(_span_openings(), dtype=object)


class SpanTails(dict):
    """Raw token -> its escaped display HTML plus `</b>`, computed once per distinct token."""

    def __missing__(self, token: str) -> str:
        tail = self[token] = token_html(token) + "</b>"
        return tail


@dataclass
class PageContext:
    """What every unit page of one layer shares."""

    model: str
    source: str
    layer: int
    root: str  # relative path from a unit page back to the site root
    bos_token: str | None
    hook: str | None
    model_anchor: str  # the model's id on the index page


def _aligned_activations(chunk: UnitChunk, token_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Activations cut or NaN-padded to each context's token count (they match in any sound store)."""
    act_lengths = np.diff(chunk.act_offsets)
    starts = np.concatenate([[0], np.cumsum(token_lengths)]).astype(np.int64)
    if np.array_equal(act_lengths, token_lengths):
        return chunk.act_values, starts
    values = np.full(int(starts[-1]), np.nan, np.float32)
    for i, n in enumerate(token_lengths):
        m = min(int(n), int(act_lengths[i]))
        a = chunk.act_offsets[i]
        values[starts[i]:starts[i] + m] = chunk.act_values[a:a + m]
    return values, starts


def _unit_scales(chunk: UnitChunk, values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per example, the activation that gets the strongest colour: the unit's max, or its largest |act|."""
    scales = chunk.max_activation[np.searchsorted(chunk.units, chunk.ex_unit)]
    bad = np.nonzero(~(scales > 0))[0]
    peaks: dict[int, float] = {}
    for i in bad:
        peak = float(np.nanmax(np.abs(values[starts[i]:starts[i + 1]]), initial=0.0))
        unit = int(chunk.ex_unit[i])
        peaks[unit] = max(peaks.get(unit, 0.0), peak)
    for i in bad:
        scales[i] = peaks[int(chunk.ex_unit[i])] or 1.0
    return scales


def render_examples(chunk: UnitChunk, tails: SpanTails, bos_token: str | None) -> tuple[list[str], list[str]]:
    """The token HTML and the data-acts string of every example in the chunk, in example order."""
    contexts = chunk.contexts
    n_examples = len(chunk.ex_unit)
    if n_examples == 0:
        return [], []
    rows = contexts.rows(chunk.ex_context)
    token_lengths = (contexts.offsets[rows + 1] - contexts.offsets[rows]).astype(np.int64)
    values, starts = _aligned_activations(chunk, token_lengths)

    # Distinct tokens get their HTML once (dictionary encoding); every example's tokens are then gathered
    # from its context with numpy indexing on object arrays, with no Python loop over tokens.
    encoded = pc.dictionary_encode(contexts.tokens)
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    distinct = encoded.dictionary.to_pylist()
    distinct_tails = np.array([tails[token] for token in distinct] + [""], dtype=object)
    total = int(starts[-1])
    gather = np.repeat(contexts.offsets[rows] - starts[:-1], token_lengths) + np.arange(total)

    scale = np.repeat(_unit_scales(chunk, values, starts), token_lengths)
    with np.errstate(invalid="ignore", divide="ignore"):
        buckets = np.nan_to_num(np.rint(values / scale * BUCKETS), nan=0.0, posinf=BUCKETS, neginf=-BUCKETS)
    index = np.clip(buckets, -BUCKETS, BUCKETS).astype(np.int64) + BUCKETS

    has_max = (chunk.ex_position >= 0) & (chunk.ex_position < token_lengths)
    index[starts[:-1][has_max] + chunk.ex_position[has_max]] += _FLAG_MAX * _STRIDE
    if bos_token is not None and bos_token in distinct:
        context_starts = contexts.offsets[:-1]
        starts_bos = np.diff(contexts.offsets) > 0
        starts_bos[starts_bos] = codes[context_starts[starts_bos]] == distinct.index(bos_token)
        index[starts[:-1][starts_bos[rows]]] += _FLAG_BOS * _STRIDE

    # Opening tag and token text interleaved, so no string is built per token: one join per example.
    parts = np.empty(2 * total, dtype=object)
    parts[0::2] = _OPENINGS[index]
    parts[1::2] = distinct_tails[codes[gather]]
    part_list = parts.tolist()
    acts_text = encode_activations(values)
    bounds = starts.tolist()
    htmls = ["".join(part_list[2 * bounds[i]:2 * bounds[i + 1]]) for i in range(n_examples)]
    acts = [acts_text[ACT_WIDTH * bounds[i]:ACT_WIDTH * bounds[i + 1]] for i in range(n_examples)]
    return htmls, acts


_EXAMPLE = ('<section class="ex"><h2><span class="rank">#{rank}</span><span class="act">{max}</span>'
            '<span class="doc" title="{doc}">{doc}</span><span class="muted">from token {start}</span></h2>'
            '<div class="ctx" data-acts="{acts}">{html}</div></section>\n')


def write_unit_pages(chunk: UnitChunk, page: PageContext, template: jinja2.Template, tails: SpanTails,
                     folder: Path) -> tuple[int, int]:
    """Write units [chunk.first, chunk.stop) of a layer as `<unit>.html`; returns (pages, bytes).

    The examples are formatted here rather than in a Jinja loop: a layer has 30,000 of them.
    """
    htmls, acts = render_examples(chunk, tails, page.bos_token)
    contexts = chunk.contexts
    documents = [str(escape(visible(name))) for name in contexts.document_names]
    rows = contexts.rows(chunk.ex_context).tolist()
    starts = contexts.start_tokens.tolist()
    ranks, maxima = chunk.ex_rank.tolist(), chunk.ex_max.tolist()
    units = chunk.units.tolist()
    bounds = np.searchsorted(chunk.ex_unit, chunk.units[chunk.first:chunk.stop + 1]).tolist()
    if chunk.stop == len(units):
        bounds.append(len(chunk.ex_unit))
    written = 0
    for i in range(chunk.first, chunk.stop):
        unit = units[i]
        examples = "".join(
            _EXAMPLE.format(rank=ranks[e], max=format_activation(maxima[e]), doc=documents[rows[e]],
                            start=starts[rows[e]], acts=acts[e], html=htmls[e])
            for e in range(bounds[i - chunk.first], bounds[i - chunk.first + 1]))
        html = template.render(
            root=page.root, model=page.model, source=page.source, layer=page.layer, unit=unit,
            hook=page.hook, model_anchor=page.model_anchor, max_activation=format_activation(chunk.max_activation[i]),
            n_examples=int(chunk.n_examples[i]), examples=Markup(examples),
            prev=units[i - 1] if i > 0 else None, next=units[i + 1] if i + 1 < len(units) else None,
        )
        data = html.encode("utf-8")
        (folder / f"{unit}.html").write_bytes(data)
        written += len(data)
    return chunk.stop - chunk.first, written
