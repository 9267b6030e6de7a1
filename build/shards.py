"""Unit data as shards: one `.js` file per SHARD_UNITS unit numbers of a layer, which the layer's unit page loads
with a `<script>` tag (the one way to load data that works from `file://` too) and renders with site.js.

A shard stores each context once, however many of its units show it: the distinct token strings (`toks`),
then the contexts as token indices over the union of the windows shown (`ctx`), then per unit its statistics,
histogram, logit effects, explanations and examples, each example pointing at a context. Activations are three
characters each, a run of zeros two (numbers.py). A card shard holds what a search result shows of a unit: its
numbers and a snippet.

Shard layout (format version 1; site.js reads it, tests decode it with `read_js`):
  {"v": 1, "bos": BOS token or null, "toks": [token, ...], "docs": [document name, ...],
   "ctx": [[doc, start_token, lo, context_length, [tok, ...]], ...], "prev": unit or null, "next": unit or null,
   "units": [{"u": unit, "s": [max, min, n_tokens, n_firing, mean, std], "h": [first bin, [count, ...]],
              "lt": [[tok or null, token_id, effect], ...], "lb": [...],
              "x": [[text, score or null, author or null], ...],
              "ex": {"top": [[ctx, lo, position, value, acts], ...], "bottom": [...],
                     "quantile": [[ctx, lo, position, value, acts, interval_lo, interval_hi], ...], "random": [...]}}]}
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from featureatlas.build.numbers import encode_examples
from featureatlas.build.reader import EXAMPLE_KINDS, UnitChunk

SHARD_UNITS = 256  # unit numbers per shard: a few hundred KB to load per page, files ~ units / 128
FORMAT_VERSION = 1
SNIPPET_BEFORE, SNIPPET_AFTER = 8, 3
MAX_POSTINGS = 100  # units kept per search term and kind: the strongest, by score
WORD = re.compile(r"\w{2,}")
PEAK, LOGIT, WORDS = 0, 1, 2  # search posting kinds: peaks on the token, promotes it, explanation mentions it


def data_key(folder: str, shard: int) -> str:
    """The path (from the site root, without `.js`) of a layer's data shard; also the name it registers as."""
    return f"{folder}/d/{shard}"


def card_key(folder: str, shard: int) -> str:
    return f"{folder}/c/{shard}"


def js_file(key: str, value: Any) -> bytes:
    """A `.js` file that hands its data to site.js: `FA.put(key, data);`. ASCII JSON, so no charset matters."""
    return f"FA.put({json.dumps(key)},{json.dumps(value, separators=(',', ':'), allow_nan=False)});\n".encode()


def read_js(text: str) -> tuple[str, Any]:
    """(key, data) of a file written by js_file: for tests and for anyone scripting a built site."""
    match = re.fullmatch(r"FA\.put\((\"(?:[^\"\\]|\\.)*\"),(.*)\);\n?", text, re.S)
    if not match:
        raise ValueError("not a featureatlas data file")
    return json.loads(match.group(1)), json.loads(match.group(2))


def numbers(values: np.ndarray) -> list[float | None]:
    """Floats as JSON with five significant digits (enough for any label); NaN is null, infinities are clipped.
    Vectorised: m * 10^e with m a five-digit integer, computed so that the double is the one nearest that decimal
    (an exact integer times or divided by an exact power of ten), whose repr then has at most five digits. Shards
    hold about a hundred such numbers a unit."""
    a = np.clip(np.asarray(values, dtype=np.float64), -3.4e38, 3.4e38)
    out = a.copy()
    ok = np.isfinite(a) & (a != 0)
    e = np.zeros(len(a), np.int64)
    e[ok] = np.floor(np.log10(np.abs(a[ok]))).astype(np.int64) - 4
    fast = ok & (np.abs(e) <= 22)  # powers of ten up to 1e22 are exact doubles
    up, down = np.clip(-e[fast], 0, 22).astype(np.float64), np.clip(e[fast], 0, 22).astype(np.float64)
    scaled_up = np.round(a[fast] * 10.0 ** up) / 10.0 ** up
    out[fast] = np.where(e[fast] < 0, scaled_up, np.round(a[fast] / 10.0 ** down) * 10.0 ** down)
    for i in np.nonzero(ok & ~fast)[0].tolist():  # tiny or huge values: rare, formatted one by one
        out[i] = float(f"{a[i]:.5g}")
    listed = out.tolist()
    if np.isnan(a).any():
        listed = [None if v != v else v for v in listed]
    return listed


def normalize_term(text: str) -> str:
    """How tokens and words are looked up: trimmed, lower case (site.js does the same)."""
    return text.strip().lower()


@dataclass
class Postings:
    """Search postings of a shard's units: term -> [(kind, unit, score)]."""

    terms: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)

    def add(self, term: str, kind: int, unit: int, score: float) -> None:
        if term:
            self.terms.setdefault(term, []).append((kind, unit, score))


class _Interner(dict):
    """Value -> its index in first-seen order, for the shard's token and document tables."""

    def __missing__(self, value: str) -> int:
        index = self[value] = len(self)
        return index


def _bounds(sorted_units: np.ndarray, units: np.ndarray) -> list[int]:
    """Row boundaries per unit in an array sorted by unit: unit j's rows are [b[j], b[j + 1])."""
    return np.searchsorted(sorted_units, np.append(units, units[-1] + 1 if len(units) else 0)).tolist()


def render_shard(chunk: UnitChunk, bos_token: str | None) -> tuple[dict, dict, Postings]:
    """The data shard, the card shard and the search postings of a chunk's units."""
    toks, docs = _Interner(), _Interner()
    stats, examples, contexts = chunk.stats, chunk.examples, chunk.contexts
    # The distinct context tokens, found by Arrow: their codes index the shard's token table.
    encoded = pc.dictionary_encode(contexts.tokens.flatten())
    for token in encoded.dictionary.to_pylist():
        toks[token]
    codes = encoded.indices.to_numpy(zero_copy_only=False).tolist()
    offsets = (contexts.tokens.offsets.to_numpy() - contexts.tokens.offsets[0].as_py()).tolist()
    ctx_rows = [[docs[doc], start, lo, 0, codes[offsets[i]:offsets[i + 1]]] for i, (doc, start, lo) in enumerate(zip(
        contexts.document, contexts.start_token.tolist(), contexts.lo.tolist(), strict=True))]
    context_tokens = list(toks)  # every context token is interned by now; logit tokens may follow

    acts = encode_examples(examples.activations, examples.start, examples.stop)
    context_of = np.searchsorted(contexts.context_id, examples.context_id)
    found = context_of < len(contexts.context_id)
    found[found] = contexts.context_id[context_of[found]] == examples.context_id[found]  # else dangling: skipped
    for c, length in zip(context_of[found].tolist(), examples.context_length[found].tolist(), strict=True):
        ctx_rows[c][3] = length
    example_rows = [[c, lo, position, value, text] for c, lo, position, value, text in zip(
        context_of.tolist(), examples.lo.tolist(), examples.position.tolist(), numbers(examples.value), acts,
        strict=True)]
    for i, lo, hi in zip(np.nonzero(examples.kind == 2)[0].tolist(), numbers(examples.interval_lo[examples.kind == 2]),
                         numbers(examples.interval_hi[examples.kind == 2]), strict=True):
        example_rows[i] += [lo, hi]
    kinds, found = examples.kind.tolist(), found.tolist()

    units = stats.units[chunk.first:chunk.stop]
    ex_bounds = _bounds(examples.unit, units)
    hist_bounds = _bounds(chunk.histograms.unit, units)
    logit_bounds = _bounds(chunk.logits.unit, units)
    expl_bounds = _bounds(chunk.explanations.unit, units)
    logits, hist, expl = chunk.logits, chunk.histograms, chunk.explanations
    effects, scores = numbers(logits.effect), numbers(expl.score)
    part = slice(chunk.first, chunk.stop)
    stat_rows = list(zip(numbers(stats.max[part]), numbers(stats.min[part]), stats.n_tokens[part].tolist(),
                         stats.n_firing[part].tolist(), numbers(stats.mean[part]), numbers(stats.std[part]),
                         strict=True))
    bottom = logits.bottom.tolist()
    frequencies = numbers(stats.frequency[chunk.first:chunk.stop])
    postings = Postings()
    unit_rows, cards = [], []
    for j, unit in enumerate(units.tolist()):
        row: dict[str, Any] = {"u": unit, "s": list(stat_rows[j])}
        h0, h1 = hist_bounds[j], hist_bounds[j + 1]
        if h1 > h0:  # [first bin, the count of every bin from there to the last non-empty one]
            counts = np.zeros(int(hist.bin[h1 - 1] - hist.bin[h0]) + 1, np.int64)
            counts[hist.bin[h0:h1] - hist.bin[h0]] = hist.count[h0:h1]
            row["h"] = [int(hist.bin[h0]), counts.tolist()]
        for polarity, key in ((False, "lt"), (True, "lb")):
            rows = [k for k in range(logit_bounds[j], logit_bounds[j + 1]) if bottom[k] == polarity]
            row[key] = [[None if logits.token[k] is None else toks[logits.token[k]], int(logits.token_id[k]),
                         effects[k]] for k in rows]
            if not polarity:
                for rank, k in enumerate(rows):
                    if logits.token[k] is not None:
                        postings.add(normalize_term(logits.token[k]), LOGIT, unit, len(rows) - rank)
        texts = [[expl.text[k], scores[k], expl.author[k]] for k in range(expl_bounds[j], expl_bounds[j + 1])]
        if texts:
            row["x"] = texts
            for word in {w.lower() for text, _, _ in texts for w in WORD.findall(text)}:
                postings.add(word, WORDS, unit, 1.0)
        grouped: dict[str, list] = {}
        for k in range(ex_bounds[j], ex_bounds[j + 1]):
            if found[k]:
                grouped.setdefault(EXAMPLE_KINDS[kinds[k]], []).append(example_rows[k])
        row["ex"] = grouped
        peaks = Counter(normalize_term(_token_at(ctx_rows[ex[0]], ex[2], context_tokens))
                        for ex in grouped.get("top", ()))
        for term, count in peaks.items():
            postings.add(term, PEAK, unit, count)
        unit_rows.append(row)
        cards.append(_card(row, frequencies[j], ctx_rows, context_tokens, texts, bos_token))

    shard = {"v": FORMAT_VERSION, "bos": bos_token, "toks": list(toks), "docs": list(docs), "ctx": ctx_rows,
             "prev": int(stats.units[chunk.first - 1]) if chunk.first > 0 else None,
             "next": int(stats.units[chunk.stop]) if chunk.stop < len(stats.units) else None,
             "units": unit_rows}
    return shard, {"v": FORMAT_VERSION, "units": cards}, postings


def _token_at(ctx: list, position: int, tokens: list[str]) -> str:
    """The token string at a position of a shard context (it holds tokens [lo, lo + len))."""
    index = position - ctx[2]
    return tokens[ctx[4][index]] if 0 <= index < len(ctx[4]) else ""


def _card(row: dict, frequency: float | None, ctx_rows: list, tokens: list[str], texts: list,
          bos_token: str | None) -> list:
    """[unit, max, min, frequency, snippet tokens, index of the max token in them, explanation]: a search
    result's line. The snippet is the strongest example around its max token, without the BOS."""
    s = row["s"]
    snippet, mark = [], -1
    top = row["ex"].get("top")
    if top:
        c, _, position, _, _ = top[0]
        ctx = ctx_rows[c]
        first = max(position - SNIPPET_BEFORE, ctx[2])
        if first == 0 and ctx[2] == 0 and bos_token is not None and ctx[4] and tokens[ctx[4][0]] == bos_token:
            first = 1 if position > 0 else 0
        stop = min(position + SNIPPET_AFTER + 1, ctx[2] + len(ctx[4]))
        snippet = [tokens[ctx[4][p - ctx[2]]] for p in range(first, stop)]
        mark = position - first
    return [row["u"], s[0], s[1], frequency, snippet, mark, texts[0][0] if texts else None]
