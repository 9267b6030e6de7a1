"""Examples as HTML: the hot path of a build, so per-token HTML is assembled with numpy and C-level joins.

Per token the markup is `<b class=a7>tok</b>`: `<b>` is a one-letter element that assistive technology does not
announce, 6 bytes a token shorter than `<span>` (`<i>` marks glyphs; style.css gives `<b>` normal weight). The
class is a bucket on a fixed scale relative to the unit's max activation (its min, for bottom examples): a1..a9
positive, n1..n9 negative, none near zero. The activations go in one `data-acts` attribute per example, three
characters a value (see numbers.py), which site.js decodes for the tooltip.

Examples show a window around their max token (min, for bottom examples): a generous one for the top examples,
a short one for the others, which are there to be scanned. That keeps pages light whatever the context length.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
from markupsafe import escape

from featureatlas.build.numbers import ACT_WIDTH, encode_activations, format_activation
from featureatlas.build.reader import EXAMPLE_KINDS, Examples, UnitStats, Windows
from featureatlas.build.tokens import token_html, visible

BUCKETS = 9
BOTTOM = EXAMPLE_KINDS.index("bottom")
# Tokens shown before and after the max (min) token: for top examples as Neuroscope does (it shows ~50 before
# and ~10 after), for the rest a glance.
WINDOWS = Windows(top=(32, 8), other=(10, 4))
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


def _scales(examples: Examples, stats: UnitStats) -> np.ndarray:
    """Per example, the |activation| that gets the strongest colour: the unit's max (its min, for bottom
    examples); else, for a unit never positive, the largest |activation| among its examples."""
    unit_index = np.searchsorted(stats.units, examples.unit)
    scales = np.where(examples.kind == BOTTOM, -stats.min[unit_index], stats.max[unit_index])
    bad = np.nonzero(~(scales > 0))[0]
    if len(bad):
        magnitude = np.nan_to_num(np.abs(examples.activations), nan=0.0)
        peaks = np.zeros(len(examples.unit))
        for i in bad.tolist():  # rare: units that are never positive
            peaks[i] = magnitude[examples.start[i]:examples.stop[i]].max(initial=0.0)
        unit_peak = np.zeros(len(stats.units))
        np.maximum.at(unit_peak, unit_index[bad], peaks[bad])
        scales[bad] = np.where(unit_peak[unit_index[bad]] > 0, unit_peak[unit_index[bad]], 1.0)
    return scales


def render_examples(examples: Examples, stats: UnitStats, tails: SpanTails,
                    bos_token: str | None) -> tuple[list[str], list[str]]:
    """The token HTML and the data-acts string of every example, in example order."""
    values = examples.activations
    starts, stops = examples.start, examples.stop
    n_shown = stops - starts

    # Distinct tokens get their HTML once (dictionary encoding); every token's HTML is then picked with numpy
    # indexing on object arrays, with no Python loop over tokens.
    encoded = pc.dictionary_encode(examples.tokens)
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    distinct = encoded.dictionary.to_pylist()
    distinct_tails = np.array([tails[token] for token in distinct] + [""], dtype=object)

    scale = np.empty(len(codes))
    scale[_token_indices(starts, n_shown)] = np.repeat(_scales(examples, stats), n_shown)
    with np.errstate(invalid="ignore", divide="ignore"):
        buckets = np.nan_to_num(np.rint(values / scale * BUCKETS), nan=0.0, posinf=BUCKETS, neginf=-BUCKETS)
    index = np.clip(buckets, -BUCKETS, BUCKETS).astype(np.int64) + BUCKETS

    offset = examples.position - examples.lo
    has_max = (offset >= 0) & (offset < n_shown)
    index[(starts + offset)[has_max]] += _FLAG_MAX * _STRIDE
    if bos_token in distinct:
        first = starts[(examples.lo == 0) & (n_shown > 0)]
        index[first[codes[first] == distinct.index(bos_token)]] += _FLAG_BOS * _STRIDE

    # Opening tag and token text interleaved, so no string is built per token: one join per example.
    parts = np.empty(2 * len(codes), dtype=object)
    parts[0::2] = _OPENINGS[index]
    parts[1::2] = distinct_tails[codes]
    part_list = parts.tolist()
    acts_text = encode_activations(values)
    htmls = ["".join(part_list[2 * a:2 * b]) for a, b in zip(starts.tolist(), stops.tolist(), strict=True)]
    acts = [acts_text[ACT_WIDTH * a:ACT_WIDTH * b] for a, b in zip(starts.tolist(), stops.tolist(), strict=True)]
    return htmls, acts


def _token_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The flat token indices of every example, example after example."""
    return np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())


class SafeText(dict):
    """Untrusted one-line text (a document name) -> escaped, visible HTML, computed once per distinct string."""

    def __missing__(self, text: str) -> str:
        safe = self[text] = str(escape(visible(text)))
        return safe


_CTX_CLASSES = np.array(["ctx", "ctx cut-r", "ctx cut-l", "ctx cut-l cut-r"], dtype=object)  # by cut side


def example_blocks(examples: Examples, htmls: list[str], acts: list[str], bos_token: str | None) -> list[str]:
    """One block of HTML per example: its rank, value, document and offset, then its highlighted tokens."""
    documents = SafeText()
    # The document offset of the first shown token (a BOS stands before the context's first text token).
    first_text = examples.start_token + np.maximum(examples.lo - (bos_token is not None), 0)
    cut = (examples.lo > 0) * 2 + (examples.lo + examples.stop - examples.start < examples.context_length)
    return [f'<div class="ex"><p><span class="rank">#{rank}</span><span class="act">{format_activation(value)}</span>'
            f'<span class="doc" title="{documents[doc]}">{documents[doc]}</span><span>from token {start}</span></p>'
            f'<div class="{ctx}" data-acts="{a}">{html}</div></div>\n'
            for rank, value, doc, start, ctx, a, html in zip(
                examples.rank.tolist(), examples.value.tolist(), examples.document, first_text.tolist(),
                _CTX_CLASSES[cut].tolist(), acts, htmls, strict=True)]
