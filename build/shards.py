"""Unit data as shards: one `.js` file per SHARD_UNITS unit numbers of a layer, which the layer's unit page loads
with a `<script>` tag (the one way to load data that works from `file://` too) and renders with unit.js.

A shard stores each context once, however many of its units show it: the distinct token strings (`toks`), then
the contexts as token indices (fixed-width base64 digits) over the union of the windows shown (`ctx`), then per
unit its statistics, histogram, logit effects, explanations and examples, each example pointing at a context.
Activations are three characters each, a run of zeros two (numbers.py). A card shard holds what a search result
shows of a unit: its numbers and a snippet.

Shard layout (format version 1; unit.js reads it, tests decode it with `read_js`):
  {"v": 1, "bos": BOS token or null, "toks": [token, ...], "docs": [document name, ...],
   "tw": digits a token index takes,
   "ctx": [[doc, start_token, lo, context_length, token indices, context_id], ...],
   "prev": unit or null, "next": unit or null,
   "units": [{"u": unit, "s": [max, min, n_tokens, n_firing, mean, std], "h": [first bin, [count, ...]],
              "lt": [[tok or null, token_id, effect], ...], "lb": [...],
              "x": [[text, score or null, author or null, score_kind or null], ...],
              "nb": {kind: [[page, unit, score] or [page, unit, score, explanation], ...], ...} (optional),
              "ab": [effects or null, ...] (optional),
              "ex": {"top": [[ctx, lo, position, value, acts, at?], ...], "bottom": [...],
                     "quantile": [[ctx, lo, position, value, acts, interval_lo, interval_hi, at?], ...],
                     "random": [...]}}],
   "nbp": [[href or null, source, layer, noun], ...] (optional)}
`nb` lists each unit's nearest units by kind (the `neighbours` view: 'cooccurrence', 'decoder', 'encoder',
'output', 'decoder_across', in that order), best first; `page` indexes `nbp`, the pages they are on: href is ""
for this layer's own unit page (link "#unit"), the other layer's unit page relative to this layer's folder, or
null where the site has no page for it. `explanation` (the unit's best, cut to NEIGHBOUR_EXPLANATION_CHARS) only
for units of this layer.
`ab` (a store with ablation effects, `harvest --ablation-effects`) has one entry per top example, in order: the
change in log p of each token after the max token that the example shows, encoded as its activations are, or
null. `context_id` is the store's, so that `serve` can rebuild a context for /api/ablate.
`at` (optional, always an example row's last element, an object): where an attention head looked from the max
token, or what a hook_z dictionary's feature read from each position (the `attributions` view), over the positions
the example shows up to its max token, encoded as activations are: {"s": shares, "w": attention weights (heads),
"b": [weight or null, share] summed over the positions before the shown ones, "c": constant term (dictionaries)}.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from featureatlas.build.numbers import ACT_DIGITS, encode_examples
from featureatlas.build.reader import EXAMPLE_KINDS, NEIGHBOUR_KINDS, Neighbours, UnitChunk

_DIGITS = np.frombuffer(ACT_DIGITS.encode("ascii"), dtype=np.uint8)
SHARD_UNITS = 256  # unit numbers per shard: a few hundred KB to load per page, files ~ units / 128
FORMAT_VERSION = 1
SNIPPET_BEFORE, SNIPPET_AFTER = 8, 3
MAX_POSTINGS = 100  # units kept per search term and kind: the strongest, by score
WORD = re.compile(r"\w{2,}")
PEAK, LOGIT, WORDS = 0, 1, 2  # search posting kinds: peaks on the token, promotes it, explanation mentions it
NEIGHBOUR_EXPLANATION_CHARS = 200
Links = dict[tuple[str, int], tuple[str | None, str]]  # (source, layer) -> (unit page href, noun), for neighbours


def data_key(folder: str, shard: int) -> str:
    """The path (from the site root, without `.js`) of a layer's data shard; also the name it registers as."""
    return f"{folder}/d/{shard}"


def card_key(folder: str, shard: int) -> str:
    return f"{folder}/c/{shard}"


def context_token_indices(shard: dict, c: int) -> list[int]:
    """Context c's token indices (into shard["toks"]) from its digits: for tests and scripts reading a site."""
    digits, width = shard["ctx"][c][4], shard["tw"]
    values = [ACT_DIGITS.index(ch) for ch in digits]
    return [sum(values[i + k] << (6 * (width - 1 - k)) for k in range(width)) for i in range(0, len(values), width)]


def js_file(key: str, value: Any) -> bytes:
    """A `.js` file that hands its data to the page scripts: `FA.put(key, data);`. ASCII JSON, so no charset matters."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False, check_circular=False)
    return f"FA.put({json.dumps(key)},{text});\n".encode()


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
    """How tokens and words are looked up: trimmed, lower case (search.js does the same)."""
    return text.strip().lower()


@dataclass
class Postings:
    """Search postings of a shard's units, as (term, kind, unit, score) rows: cheap to append, grouped by term
    only once, when the index is written."""

    rows: list[tuple[str, int, int, float]] = field(default_factory=list)


class _Interner(dict):
    """Value -> its index in first-seen order, for the shard's token and document tables."""

    def __missing__(self, value: str) -> int:
        index = self[value] = len(self)
        return index


def _bounds(sorted_units: np.ndarray, units: np.ndarray) -> list[int]:
    """Row boundaries per unit in an array sorted by unit: unit j's rows are [b[j], b[j + 1])."""
    return np.searchsorted(sorted_units, np.append(units, units[-1] + 1 if len(units) else 0)).tolist()


def _encode_indices(codes: np.ndarray, width: int) -> bytes:
    """Token indices as `width` base64url digits each (the activations' digits), most significant first."""
    shifts = 6 * np.arange(width - 1, -1, -1)
    return _DIGITS[(codes[:, None] >> shifts[None, :]) & 63].tobytes()


def neighbour_links(model: str, folder: str, layers: list[dict]) -> Links:
    """(source, layer) -> (href of its unit page from `folder`, its noun) for every layer of `model`; layers as
    the site plan lists them (model, source, layer, path, noun). The layer in `folder` itself gets href ""."""
    return {(layer["source"], layer["layer"]): ("" if layer["path"] == folder else
                                                 posixpath.relpath(layer["path"], folder) + "/unit.html",
                                                 layer["noun"])
            for layer in layers if layer["model"] == model}


def _neighbour_lists(neighbours: Neighbours | None, units: np.ndarray, links: Links) -> tuple[list[dict], list]:
    """Each unit's `nb` ({} when it has none) and the shard's `nbp`, the pages they point to."""
    if neighbours is None or not len(neighbours.unit):
        return [{} for _ in units], []
    pages: dict[tuple[str, int], int] = {}
    nbp: list = []
    scores, bounds = numbers(neighbours.score), _bounds(neighbours.unit, units)
    layers, others = neighbours.other_layer.tolist(), neighbours.other_unit.tolist()
    lists = []
    for j in range(len(units)):
        grouped: dict[str, list] = {}
        for r in range(bounds[j], bounds[j + 1]):
            where = (neighbours.other_source[r], layers[r])
            if where not in pages:
                pages[where] = len(nbp)
                href, unit_noun = links.get(where, (None, "Unit"))
                nbp.append([href, where[0], where[1], unit_noun])
            entry = [pages[where], others[r], scores[r]]
            text = neighbours.explanation[r]
            if text is not None:
                entry.append(text if len(text) <= NEIGHBOUR_EXPLANATION_CHARS else
                             text[:NEIGHBOUR_EXPLANATION_CHARS - 1].rstrip() + "\u2026")
            grouped.setdefault(neighbours.kind[r], []).append(entry)
        lists.append({kind: grouped[kind] for kind in NEIGHBOUR_KINDS if kind in grouped})
    return lists, nbp


def render_shard(chunk: UnitChunk, bos_token: str | None, links: Links | None = None
                 ) -> tuple[dict, dict, Postings]:
    """The data shard, the card shard and the search postings of a chunk's units. links: where the pages of
    the units' neighbours are (neighbour_links); those not in it are listed without a link."""
    toks, docs = _Interner(), _Interner()
    stats, examples, contexts = chunk.stats, chunk.examples, chunk.contexts
    # The distinct context tokens, found by Arrow: their codes index the shard's token table. Each context's
    # tokens are written as a string of fixed-width base64 digits (two a token for up to 4,096 distinct tokens).
    encoded = pc.dictionary_encode(contexts.tokens.flatten())
    for token in encoded.dictionary.to_pylist():
        toks[token]
    context_tokens = list(toks)  # every context token is interned by now; logit tokens may follow
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    width = next(w for w in (2, 3, 4) if len(context_tokens) <= 64 ** w)
    text = _encode_indices(codes, width).decode("ascii")
    offsets = contexts.tokens.offsets.to_numpy().astype(np.int64) - contexts.tokens.offsets[0].as_py()
    context_lo = contexts.lo.astype(np.int64)
    ctx_rows = [[docs[doc], start, lo, 0, text[width * a:width * b], cid] for doc, start, lo, a, b, cid in zip(
        contexts.document, contexts.start_token.tolist(), context_lo.tolist(), offsets[:-1].tolist(),
        offsets[1:].tolist(), contexts.context_id.tolist(), strict=True)]

    acts = encode_examples(examples.activations, examples.start, examples.stop)
    context_of = np.searchsorted(contexts.context_id, examples.context_id)
    found = context_of < len(contexts.context_id)
    found[found] = contexts.context_id[context_of[found]] == examples.context_id[found]  # else dangling: skipped
    for c, length in zip(context_of[found].tolist(), examples.context_length[found].tolist(), strict=True):
        ctx_rows[c][3] = length
    example_rows = [[c, lo, position, value, text] for c, lo, position, value, text in zip(
        context_of.tolist(), examples.lo.tolist(), examples.position.tolist(), numbers(examples.value), acts,
        strict=True)]
    quantile = examples.kind == 2
    for i, lo, hi in zip(np.nonzero(quantile)[0].tolist(), numbers(examples.interval_lo[quantile]),
                         numbers(examples.interval_hi[quantile]), strict=True):
        example_rows[i] += [lo, hi]
    for k, at in _attribution_fields(chunk).items():
        example_rows[k].append(at)
    kinds, found_list = examples.kind.tolist(), found.tolist()
    ablated = _ablation_texts(chunk, examples)

    # The token each top example peaks on, for search: its code, then its normalised term.
    code_at = np.full(len(examples.unit), -1, np.int64)
    where = found & (examples.kind == 0)
    c = context_of[where]
    index = offsets[c] + examples.position[where] - context_lo[c]
    inside = (index >= offsets[c]) & (index < offsets[c + 1])
    code_at[np.nonzero(where)[0][inside]] = codes[index[inside]]
    terms = [normalize_term(token) for token in context_tokens]

    units = stats.units[chunk.first:chunk.stop]
    ex_bounds = _bounds(examples.unit, units)
    hist_bounds = _bounds(chunk.histograms.unit, units)
    logit_bounds = _bounds(chunk.logits.unit, units)
    expl_bounds = _bounds(chunk.explanations.unit, units)
    logits, hist, expl = chunk.logits, chunk.histograms, chunk.explanations
    logit_rows = [[None if token is None else toks[token], token_id, effect] for token, token_id, effect in zip(
        logits.token, logits.token_id.tolist(), numbers(logits.effect), strict=True)]
    scores = numbers(expl.score)
    part = slice(chunk.first, chunk.stop)
    stat_rows = list(zip(numbers(stats.max[part]), numbers(stats.min[part]), stats.n_tokens[part].tolist(),
                         stats.n_firing[part].tolist(), numbers(stats.mean[part]), numbers(stats.std[part]),
                         strict=True))
    frequencies = numbers(stats.frequency[part])
    bottom = logits.bottom.tolist()
    postings = Postings()
    add = postings.rows.append
    unit_rows, cards = [], []
    neighbour_rows, neighbour_pages = _neighbour_lists(chunk.neighbours, units, links or {})
    for j, unit in enumerate(units.tolist()):
        row: dict[str, Any] = {"u": unit, "s": list(stat_rows[j])}
        h0, h1 = hist_bounds[j], hist_bounds[j + 1]
        if h1 > h0:  # [first bin, the count of every bin from there to the last non-empty one]
            counts = np.zeros(int(hist.bin[h1 - 1] - hist.bin[h0]) + 1, np.int64)
            counts[hist.bin[h0:h1] - hist.bin[h0]] = hist.count[h0:h1]
            row["h"] = [int(hist.bin[h0]), counts.tolist()]
        l0, l1 = logit_bounds[j], logit_bounds[j + 1]
        split = l0 + bottom[l0:l1].count(False)
        row["lt"], row["lb"] = logit_rows[l0:split], logit_rows[split:l1]
        for rank, k in enumerate(range(l0, split)):
            token = logits.token[k]
            if token is not None and token.strip():
                add((normalize_term(token), LOGIT, unit, split - l0 - rank))
        texts = [[expl.text[k], scores[k], expl.author[k], expl.score_kind[k]]
                 for k in range(expl_bounds[j], expl_bounds[j + 1])]
        if texts:
            row["x"] = texts
            for word in {w.lower() for text, *_ in texts for w in WORD.findall(text)}:
                add((word, WORDS, unit, 1))
        if neighbour_rows[j]:
            row["nb"] = neighbour_rows[j]
        grouped: dict[str, list] = {}
        e0, e1 = ex_bounds[j], ex_bounds[j + 1]
        for k in range(e0, e1):
            if found_list[k]:
                grouped.setdefault(EXAMPLE_KINDS[kinds[k]], []).append(example_rows[k])
        row["ex"] = grouped
        shown = [ablated.get(k) for k in range(e0, e1) if found_list[k] and kinds[k] == 0]
        if any(text is not None for text in shown):
            row["ab"] = shown
        peaks = Counter(terms[code] for code in code_at[e0:e1].tolist() if code >= 0)
        for term, count in peaks.items():
            if term:
                add((term, PEAK, unit, count))
        unit_rows.append(row)
        cards.append(_card(row, frequencies[j], ctx_rows, width, context_tokens, codes, offsets, texts, bos_token))

    shard = {"v": FORMAT_VERSION, "bos": bos_token, "toks": list(toks), "tw": width, "docs": list(docs),
             "ctx": ctx_rows, "prev": int(stats.units[chunk.first - 1]) if chunk.first > 0 else None,
             "next": int(stats.units[chunk.stop]) if chunk.stop < len(stats.units) else None,
             "units": unit_rows}
    if neighbour_pages:
        shard["nbp"] = neighbour_pages
    return shard, {"v": FORMAT_VERSION, "units": cards}, postings


def _ablation_texts(chunk: UnitChunk, examples: Any) -> dict[int, str]:
    """Example index -> its `ab` text, for top examples whose ablation (same unit, context and max position) the
    store holds."""
    ab = chunk.ablations
    if ab is None or not len(ab.unit):
        return {}
    row_of = {(u, c, p): i for i, (u, c, p) in enumerate(zip(ab.unit.tolist(), ab.context_id.tolist(),
                                                              ab.position.tolist(), strict=True))}
    texts = encode_examples(ab.effects, ab.start, ab.stop)
    found = {}
    for k in np.nonzero(examples.kind == 0)[0].tolist():
        i = row_of.get((int(examples.unit[k]), int(examples.context_id[k]), int(examples.position[k])))
        if i is not None:
            found[k] = texts[i]
    return found


def _attribution_fields(chunk: UnitChunk) -> dict[int, dict]:
    """Example index -> its `at` object, for the examples whose attribution the store holds."""
    at = chunk.attributions
    if at is None or not len(at.example):
        return {}
    shares = encode_examples(at.shares, at.start, at.stop)
    weights = encode_examples(at.weights, at.start, at.stop)
    before, constants = numbers(at.before.reshape(-1)), numbers(at.constant)
    entries = {}
    for i, (k, head) in enumerate(zip(at.example.tolist(), at.head.tolist(), strict=True)):
        entry = {"s": shares[i], "b": before[2 * i:2 * i + 2]}
        if head:
            entry["w"] = weights[i]
        else:
            entry["c"] = constants[i]
        entries[k] = entry
    return entries


def _card(row: dict, frequency: float | None, ctx_rows: list, width: int, tokens: list[str], codes: np.ndarray,
          offsets: np.ndarray, texts: list, bos_token: str | None) -> list:
    """[unit, max, min, frequency, snippet tokens, index of the max token in them, explanation]: a search
    result's line. The snippet is the strongest example around its max token, without the BOS."""
    s = row["s"]
    snippet, mark = [], -1
    top = row["ex"].get("top")
    if top:
        c, position = top[0][0], top[0][2]
        lo, n = ctx_rows[c][2], len(ctx_rows[c][4]) // width
        context = codes[offsets[c]:offsets[c] + n]
        first = max(position - SNIPPET_BEFORE, lo)
        if first == 0 and bos_token is not None and n and tokens[context[0]] == bos_token:
            first = 1 if position > 0 else 0
        stop = min(position + SNIPPET_AFTER + 1, lo + n)
        snippet = [tokens[code] for code in context[first - lo:stop - lo].tolist()]
        mark = position - first
    return [row["u"], s[0], s[1], frequency, snippet, mark, texts[0][0] if texts else None]
