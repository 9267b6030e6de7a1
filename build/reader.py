"""Bulk reads from a store, only through its public views: one query per kind of row, columnar results."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from featureatlas.store.schema import HISTOGRAM_HALF, StoreError

EXAMPLE_KINDS = ("top", "bottom", "quantile", "random")  # page order; the codes below index this tuple


@dataclass(frozen=True)
class LayerKey:
    """One (model, source, layer): the unit of work and of the URL layout."""

    model: str
    source: str
    layer: int


@dataclass(frozen=True)
class LayerInfo:
    """A layer of a source, with what its `sources` row says about it (None/defaults when it has none)."""

    key: LayerKey
    n_units: int  # units the store holds rows for
    n_active: int  # units that fired (activation > 0) at least once
    max_unit: int  # the highest unit number (-1 when none): shards are ranges of unit numbers
    hook: str | None  # the transformers module read
    kind: str | None = None  # 'mlp' | 'resid' | 'sae' | 'transcoder'
    hook_name: str | None = None  # TransformerLens's name for the hook
    hook_out_name: str | None = None  # transcoders: where the decoder writes
    signed: bool = False  # units go negative: bottom examples, min column
    histogram_every: int = 1
    dictionary_path: str | None = None
    dictionary_format: str | None = None
    architecture: str | None = None
    config: str | None = None  # the dictionary's config, JSON text


NOUNS = {"mlp": "Neuron", "resid": "Dimension", "sae": "Feature", "transcoder": "Feature", "attn": "Head"}


def noun(info: LayerInfo) -> str:
    """What a unit of this source is called: Neuron, Dimension, Feature, Head."""
    return NOUNS.get(info.kind or "", "Unit")


@dataclass
class Catalog:
    """Everything the index page needs, read once by the main process."""

    runs: list[dict[str, Any]]
    layers: list[LayerInfo]

    def models(self) -> list[str]:
        return sorted({info.key.model for info in self.layers} | {run["model"] for run in self.runs})

    def bos_token(self, model: str) -> str | None:
        """The latest run's BOS token for a model (None when the tokenizer has none or no run is recorded)."""
        runs = [run for run in self.runs if run["model"] == model]
        return runs[-1]["bos_token"] if runs else None


@dataclass(frozen=True)
class Windows:
    """How many tokens (before, after) the max (min) token examples show: a page's size and build time then do
    not grow with the context length."""

    top: tuple[int, int]
    other: tuple[int, int]  # bottom examples and the quantile and random samples


@dataclass
class UnitStats:
    """Every unit of a layer (all of them, for prev/next), sorted; floats are NaN where the store has NULL."""

    units: np.ndarray
    max: np.ndarray
    min: np.ndarray
    n_tokens: np.ndarray
    n_firing: np.ndarray
    frequency: np.ndarray
    mean: np.ndarray
    std: np.ndarray


@dataclass
class Examples:
    """Examples of a chunk's units, sorted by unit, kind (EXAMPLE_KINDS order), interval (highest first), rank.
    Each shows positions [lo, hi) of its context (contexts.index[i] in the chunk's Contexts): its activations
    are activations[start:stop] of the flat array, which stays in the order the store returned it."""

    unit: np.ndarray
    kind: np.ndarray  # index into EXAMPLE_KINDS
    interval_lo: np.ndarray  # NaN unless quantile
    interval_hi: np.ndarray
    rank: np.ndarray
    context_id: np.ndarray
    position: np.ndarray  # of the context's max (its min, for bottom examples), in the context
    value: np.ndarray  # the context's max (its min, for bottom examples)
    lo: np.ndarray  # the first shown position
    hi: np.ndarray  # one past the last shown position
    context_length: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    activations: np.ndarray  # float32, one per shown token


@dataclass
class Contexts:
    """The contexts a chunk's examples show, each once: tokens [lo, lo + len(tokens)) of the context, the union
    of the windows its examples show. Many units of a chunk share contexts, so a shard stores each once."""

    context_id: np.ndarray
    document: list[str]
    start_token: np.ndarray  # the context's offset in its document
    lo: np.ndarray
    tokens: pa.ListArray  # of strings: kept in Arrow, where a shard's distinct tokens are found without a loop


@dataclass
class Histograms:
    """Non-empty histogram bins of a chunk's units, sorted by unit then bin (see the `histograms` view)."""

    unit: np.ndarray
    bin: np.ndarray
    count: np.ndarray


@dataclass
class Logits:
    """Logit effects of a chunk's units, sorted by unit, polarity (top first), rank."""

    unit: np.ndarray
    bottom: np.ndarray  # True for suppressed tokens
    token_id: np.ndarray
    token: list[str | None]  # None when the vocabulary lacks the id
    effect: np.ndarray


@dataclass
class Explanations:
    """Explanations of a chunk's units (the `explanations` view, when the store has one), sorted by unit."""

    unit: np.ndarray
    text: list[str]
    score: np.ndarray  # NaN when none was given
    author: list[str | None]
    score_kind: list[str | None]  # what each score measures


NEIGHBOURS_SHOWN = 10  # per unit and kind (a store may hold more)
NEIGHBOUR_KINDS = ("cooccurrence", "decoder", "encoder", "output", "decoder_across")  # schema.sql's; page order


@dataclass
class Neighbours:
    """Each unit's nearest units (the `neighbours` view, when the store has one), sorted by unit, kind, rank;
    explanation: the other unit's best one where it is in this layer (another layer's may change without this
    one's pages being rebuilt), else None."""

    unit: np.ndarray
    kind: list[str]
    other_source: list[str]
    other_layer: np.ndarray
    other_unit: np.ndarray
    score: np.ndarray
    explanation: list[str | None]


@dataclass
class Ablations:
    """Ablation effects of a chunk's top examples (the `ablations` view, when the store has one), sorted by unit:
    row i removes the unit at `position` of context `context_id`; effects[start[i]:stop[i]] are the changes in
    log p of the tokens after it that a top example's window shows."""

    unit: np.ndarray
    context_id: np.ndarray
    position: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    effects: np.ndarray  # float32, flat


@dataclass
class Attributions:
    """Attributions of a chunk's examples (the `attributions` view: heads, hook_z dictionaries) over the positions
    each example shows up to its max token, [lo, min(hi, position + 1)): row i is example example[i]'s (an index
    into the chunk's Examples), its values shares[start[i]:stop[i]] and, for a head, weights[start[i]:stop[i]]
    (NaN for a dictionary); before[i] sums (weight, share) over the positions before lo, which are not shown."""

    example: np.ndarray
    head: np.ndarray  # bool: a head's (weights and shares), else a dictionary's (shares and a constant)
    start: np.ndarray
    stop: np.ndarray
    weights: np.ndarray  # float32, flat
    shares: np.ndarray  # float32, flat
    before: np.ndarray  # float64 [rows, 2]
    constant: np.ndarray  # NaN for heads


@dataclass
class UnitChunk:
    """Units [first, stop) of a layer (indices into stats.units) and everything their pages show."""

    stats: UnitStats
    first: int
    stop: int
    examples: Examples
    contexts: Contexts
    histograms: Histograms
    logits: Logits
    explanations: Explanations
    neighbours: Neighbours | None = None
    ablations: Ablations | None = None
    attributions: Attributions | None = None


def query(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> pa.Table:
    rel = con.sql(sql, params=params)
    # duckdb >= 1.4 names it to_arrow_table and deprecates the old name
    fetch = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table
    return fetch()


def column(table: pa.Table, name: str, dtype: Any = None) -> np.ndarray:
    """One column of a query's result as a numpy array (floating NULLs as NaN)."""
    values = table.column(name).combine_chunks()
    if dtype is not None and pa.types.is_floating(values.type):
        return values.to_numpy(zero_copy_only=False).astype(dtype)  # NULL -> NaN
    array = values.to_numpy(zero_copy_only=False)
    return array.astype(dtype) if dtype is not None else array


def _flat_list(table: pa.Table, name: str) -> tuple[pa.Array, np.ndarray]:
    column = table.column(name).combine_chunks()
    if len(column) == 0:
        return column.flatten(), np.zeros(1, np.int64)
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.slice(offsets[0], offsets[-1] - offsets[0])
    return values, offsets - offsets[0]


def read_catalog(con: duckdb.DuckDBPyConnection) -> Catalog:
    """Runs and the layers of every (model, source), with unit counts and the source's description."""
    runs = query(con, "SELECT * FROM runs ORDER BY model, started_at, run_id", []).to_pylist()
    for run in runs:
        for key in ("started_at", "finished_at"):
            if isinstance(run.get(key), datetime):
                run[key] = run[key].strftime("%Y-%m-%d %H:%M")
    rows = query(con, """
        WITH u AS (SELECT model, source, layer, count(*) AS n_units, count(*) FILTER (frequency > 0) AS n_active,
                          max(unit) AS max_unit
                   FROM units GROUP BY ALL)
        SELECT model, source, layer, coalesce(u.n_units, 0) AS n_units, coalesce(u.n_active, 0) AS n_active,
               coalesce(u.max_unit, -1) AS max_unit,
               s.hook, s.kind, s.hook_name, s.hook_out_name, coalesce(s.signed, false) AS signed,
               coalesce(s.histogram_every, 1) AS histogram_every, s.dictionary_path, s.dictionary_format,
               s.architecture, s.config::VARCHAR AS config
        FROM sources s FULL OUTER JOIN u USING (model, source, layer)
        ORDER BY model, source, layer""", []).to_pylist()
    layers = [LayerInfo(LayerKey(row.pop("model"), row.pop("source"), int(row.pop("layer"))), **row) for row in rows]
    for info in layers:  # units are numbered 0..n-1; pages and shards are planned over that range
        if info.max_unit >= info.n_units:
            raise StoreError(f"store: {info.key.source} layer {info.key.layer} numbers its {info.n_units:,} units up "
                             f"to {info.max_unit:,}; the store is damaged or not written by featureatlas harvest")
    return Catalog(runs=runs, layers=layers)


_IN_CHUNK = "model = ? AND source = ? AND layer = ? AND unit BETWEEN ? AND ?"


def read_layer_stats(con: duckdb.DuckDBPyConnection, key: LayerKey) -> UnitStats:
    """Every unit of a layer with its statistics, sorted by unit."""
    t = query(con, """SELECT unit, max_activation, min_activation, n_tokens, n_firing, frequency, mean, std
                       FROM statistics WHERE model = ? AND source = ? AND layer = ? ORDER BY unit""",
               [key.model, key.source, key.layer])
    return UnitStats(units=column(t, "unit", np.int64), max=column(t, "max_activation", np.float64),
                     min=column(t, "min_activation", np.float64), n_tokens=column(t, "n_tokens", np.int64),
                     n_firing=column(t, "n_firing", np.int64), frequency=column(t, "frequency", np.float64),
                     mean=column(t, "mean", np.float64), std=column(t, "std", np.float64))


def _aligned(tokens: np.ndarray, acts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """One activation per token, from list offsets of both; NaN where a store has fewer activations than
    tokens, extra ones dropped (they match in any sound store)."""
    if np.array_equal(tokens, acts):
        return values
    n_tokens = np.diff(tokens)
    within = np.arange(int(tokens[-1])) - np.repeat(tokens[:-1], n_tokens)
    available = within < np.repeat(np.diff(acts), n_tokens)
    index = np.minimum(np.repeat(acts[:-1], n_tokens) + within, max(len(values) - 1, 0))
    return np.where(available, values[index] if len(values) else np.nan, np.nan).astype(np.float32)


def _read_examples(con: duckdb.DuckDBPyConnection, params: list[Any], windows: Windows) -> Examples:
    """Examples with the activations around their max (min) token: windows.top for top examples, windows.other
    for the rest (a window that starts at the first text token takes the BOS too)."""
    ex = query(con, f"""
        WITH e AS (
            SELECT unit, CASE example_kind WHEN 'top' THEN 0 WHEN 'bottom' THEN 1 WHEN 'quantile' THEN 2 ELSE 3
                         END AS kind,
                   interval_lo, interval_hi, rank, context_id, max_position, max_activation, activations,
                   len(activations) AS context_length,
                   max_position - CASE WHEN example_kind = 'top' THEN ? ELSE ? END AS first,
                   max_position + 1 + CASE WHEN example_kind = 'top' THEN ? ELSE ? END AS stop
            FROM examples WHERE {_IN_CHUNK} AND example_kind IN ('top', 'bottom', 'quantile', 'random')),
        w AS (SELECT *, CASE WHEN first <= 1 THEN 0 ELSE first END AS lo, least(stop, context_length) AS hi FROM e)
        SELECT unit, kind, interval_lo, interval_hi, rank, context_id, max_position, max_activation, lo, hi,
               context_length, list_slice(activations, lo + 1, hi) AS activations
        FROM w""", [windows.top[0], windows.other[0], windows.top[1], windows.other[1]] + params)
    values, offsets = _flat_list(ex, "activations")
    unit, kind, rank = column(ex, "unit", np.int64), column(ex, "kind", np.int64), column(ex, "rank", np.int64)
    interval_lo, interval_hi = column(ex, "interval_lo", np.float64), column(ex, "interval_hi", np.float64)
    order = np.lexsort((rank, -interval_lo, -interval_hi, kind, unit))  # NaN intervals tie, then rank decides
    return Examples(
        unit=unit[order], kind=kind[order], interval_lo=interval_lo[order], interval_hi=interval_hi[order],
        rank=rank[order], context_id=column(ex, "context_id", np.int64)[order],
        position=column(ex, "max_position", np.int64)[order], value=column(ex, "max_activation", np.float64)[order],
        lo=column(ex, "lo", np.int64)[order], hi=column(ex, "hi", np.int64)[order],
        context_length=column(ex, "context_length", np.int64)[order],
        start=offsets[:-1][order], stop=offsets[1:][order],
        activations=values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False))


def _read_contexts(con: duckdb.DuckDBPyConnection, examples: Examples) -> Contexts:
    """Each context the examples show, once, with the tokens of the union of their windows."""
    ids, inverse = np.unique(examples.context_id, return_inverse=True)
    lo = np.full(len(ids), np.iinfo(np.int64).max)
    hi = np.zeros(len(ids), np.int64)
    np.minimum.at(lo, inverse, examples.lo)
    np.maximum.at(hi, inverse, examples.hi)
    windows = pa.table({"context_id": ids, "lo": lo, "hi": hi})
    con.register("featureatlas_windows", windows)
    try:
        t = query(con, """
            SELECT w.context_id, c.start_token, coalesce(d.name, '') AS document, w.lo,
                   list_slice(c.tokens, w.lo + 1, w.hi) AS tokens
            FROM featureatlas_windows w JOIN contexts c USING (context_id)  -- a dangling example is skipped
            LEFT JOIN documents d USING (document_id) ORDER BY w.context_id""", [])
    finally:
        con.unregister("featureatlas_windows")
    return Contexts(context_id=column(t, "context_id", np.int64), document=t.column("document").to_pylist(),
                    start_token=column(t, "start_token", np.int64), lo=column(t, "lo", np.int64),
                    tokens=t.column("tokens").combine_chunks())


def _read_histograms(con: duckdb.DuckDBPyConnection, params: list[Any]) -> Histograms:
    t = query(con, f"SELECT unit, bin, count FROM histograms WHERE {_IN_CHUNK} AND count > 0 ORDER BY unit, bin",
               params)
    bins = column(t, "bin", np.int64)
    if bins.size and np.abs(bins).max() > HISTOGRAM_HALF:  # a page's histogram is sized by its range of bins
        raise StoreError(f"store: histogram bin {int(bins[np.abs(bins).argmax()])} of {params[1]} layer {params[2]} "
                         f"is outside -{HISTOGRAM_HALF}..{HISTOGRAM_HALF}; the store is damaged or not written by "
                         "featureatlas harvest")
    return Histograms(unit=column(t, "unit", np.int64), bin=bins, count=column(t, "count", np.int64))


def _read_logits(con: duckdb.DuckDBPyConnection, params: list[Any]) -> Logits:
    t = query(con, f"""SELECT unit, polarity = 'bottom' AS bottom, token_id, token, effect FROM logit_effects
                        WHERE {_IN_CHUNK} AND polarity IN ('top', 'bottom') ORDER BY unit, bottom, rank""", params)
    return Logits(unit=column(t, "unit", np.int64), bottom=column(t, "bottom", bool),
                  token_id=column(t, "token_id", np.int64), token=t.column("token").to_pylist(),
                  effect=column(t, "effect", np.float64))


def has_view(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = ?", [name]).fetchall()[0][0])


def _read_explanations(con: duckdb.DuckDBPyConnection, params: list[Any]) -> Explanations:
    """A store annotated with `featureatlas annotate` has an `explanations` view; older ones have none."""
    if not has_view(con, "explanations"):
        return Explanations(unit=np.zeros(0, np.int64), text=[], score=np.zeros(0), author=[], score_kind=[])
    t = query(con, f"""SELECT unit, text, score, author, score_kind FROM explanations WHERE {_IN_CHUNK}
                        ORDER BY unit, score DESC NULLS LAST, text, score_kind""", params)
    return Explanations(unit=column(t, "unit", np.int64), text=t.column("text").to_pylist(),
                        score=column(t, "score", np.float64), author=t.column("author").to_pylist(),
                        score_kind=t.column("score_kind").to_pylist())


def _read_neighbours(con: duckdb.DuckDBPyConnection, params: list[Any]) -> Neighbours:
    """The first NEIGHBOURS_SHOWN of each kind schema.sql documents; stores written before neighbours existed
    have none."""
    if not has_view(con, "neighbours"):
        return Neighbours(np.zeros(0, np.int64), [], [], np.zeros(0, np.int64), np.zeros(0, np.int64),
                          np.zeros(0), [])
    annotated = has_view(con, "explanations")
    explained = ("""(SELECT unit, arg_max(text, coalesce(score, -1e308)) AS text FROM explanations
                      WHERE model = ? AND source = ? AND layer = ? GROUP BY unit)"""
                 if annotated else "(SELECT NULL::INTEGER AS unit, NULL::VARCHAR AS text)")
    t = query(con, f"""
        SELECT n.unit, n.kind, n.other_source, n.other_layer, n.other_unit, n.score, e.text AS explanation
        FROM (SELECT * FROM neighbours WHERE {_IN_CHUNK} AND rank BETWEEN 1 AND {NEIGHBOURS_SHOWN}
              AND kind IN {NEIGHBOUR_KINDS}) n
        LEFT JOIN {explained} e ON n.other_source = ? AND n.other_layer = ? AND e.unit = n.other_unit
        ORDER BY n.unit, n.kind, n.rank""",
              params + (params[:3] if annotated else []) + params[1:3])
    return Neighbours(unit=column(t, "unit", np.int64), kind=t.column("kind").to_pylist(),
                      other_source=t.column("other_source").to_pylist(),
                      other_layer=column(t, "other_layer", np.int64), other_unit=column(t, "other_unit", np.int64),
                      score=column(t, "score", np.float64), explanation=t.column("explanation").to_pylist())


def has_layout(con: duckdb.DuckDBPyConnection, key: LayerKey) -> bool:
    """Whether a layer has a placed unit on a map (then the site has its map page: build/map_page.py)."""
    if not has_view(con, "map"):
        return False
    return bool(con.execute("""SELECT count(*) > 0 FROM map WHERE model = ? AND source = ? AND layer = ?
                               AND isfinite(x) AND isfinite(y)""", [key.model, key.source, key.layer]).fetchall()[0][0])


def _read_ablations(con: duckdb.DuckDBPyConnection, params: list[Any], windows: Windows) -> Ablations | None:
    """The effects a top example's window shows (windows.top[1] tokens after its max); None for a store without
    the view (written before it existed)."""
    if not has_view(con, "ablations"):
        return None
    t = query(con, f"""SELECT unit, context_id, position, list_slice(effects, 1, ?) AS effects FROM ablations
                        WHERE {_IN_CHUNK} ORDER BY unit, context_id""", [windows.top[1]] + params)
    values, offsets = _flat_list(t, "effects")
    return Ablations(unit=column(t, "unit", np.int64), context_id=column(t, "context_id", np.int64),
                     position=column(t, "position", np.int64), start=offsets[:-1], stop=offsets[1:],
                     effects=values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False))


def read_unit_chunk(con: duckdb.DuckDBPyConnection, key: LayerKey, stats: UnitStats, first: int, stop: int,
                    windows: Windows) -> UnitChunk:
    """Units [first, stop) of a layer (by position in stats.units) with everything their pages show."""
    stop = min(stop, len(stats.units))
    lo, hi = (int(stats.units[first]), int(stats.units[stop - 1])) if stop > first else (0, -1)
    params = [key.model, key.source, key.layer, lo, hi]
    examples = _read_examples(con, params, windows)
    return UnitChunk(stats=stats, first=first, stop=stop, examples=examples, contexts=_read_contexts(con, examples),
                     histograms=_read_histograms(con, params), logits=_read_logits(con, params),
                     explanations=_read_explanations(con, params), neighbours=_read_neighbours(con, params),
                     ablations=_read_ablations(con, params, windows),
                     attributions=_read_attributions(con, params, examples))


def _read_attributions(con: duckdb.DuckDBPyConnection, params: list[Any], examples: Examples
                       ) -> Attributions | None:
    """Each example's attribution (same unit, context and max position), cut to what its window shows; None for
    a store without the view or a chunk without any."""
    if not has_view(con, "attributions"):
        return None
    t = query(con, f"""SELECT unit, context_id, position, kind = 'head' AS head, weights, shares, constant
                        FROM attributions WHERE {_IN_CHUNK}""", params)
    if t.num_rows == 0:
        return None
    shares, offsets = _flat_list(t, "shares")
    weights, weight_offsets = _flat_list(t, "weights")
    shares = shares.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    weights = weights.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    head, constant = column(t, "head", bool), column(t, "constant", np.float64)
    row_of = {key: i for i, key in enumerate(zip(column(t, "unit", np.int64).tolist(),
                                                 column(t, "context_id", np.int64).tolist(),
                                                 column(t, "position", np.int64).tolist(), strict=True))}
    found, share_parts, weight_parts, before = [], [], [], []
    for k, key in enumerate(zip(examples.unit.tolist(), examples.context_id.tolist(), examples.position.tolist(),
                                strict=True)):
        i = row_of.get(key)
        if i is None:
            continue
        a, n = int(offsets[i]), int(offsets[i + 1] - offsets[i])
        lo, hi = min(int(examples.lo[k]), n), min(int(examples.hi[k]), n)
        share_parts.append(shares[a + lo:a + hi])
        if head[i] and weight_offsets[i + 1] - weight_offsets[i] == n:
            w = weights[int(weight_offsets[i]):int(weight_offsets[i + 1])]
            weight_parts.append(w[lo:hi])
            before.append((float(w[:lo].sum()), float(shares[a:a + lo].sum())))
        else:
            weight_parts.append(np.full(hi - lo, np.nan, np.float32))
            before.append((np.nan, float(shares[a:a + lo].sum())))
        found.append((k, i))
    bounds = np.concatenate([[0], np.cumsum([len(p) for p in share_parts])]).astype(np.int64)
    rows = np.array([i for _, i in found], np.int64)
    return Attributions(
        example=np.array([k for k, _ in found], np.int64), head=head[rows] if len(rows) else np.zeros(0, bool),
        start=bounds[:-1], stop=bounds[1:],
        weights=np.concatenate(weight_parts) if weight_parts else np.zeros(0, np.float32),
        shares=np.concatenate(share_parts) if share_parts else np.zeros(0, np.float32),
        before=np.array(before, np.float64).reshape(-1, 2),
        constant=constant[rows] if len(rows) else np.zeros(0))


def read_layer_explanations(con: duckdb.DuckDBPyConnection, key: LayerKey) -> dict[int, str]:
    """Each explained unit's best explanation (highest score, then first by text): the layer page's column."""
    if not has_view(con, "explanations"):
        return {}
    rows = con.execute("""SELECT unit, arg_max(text, coalesce(score, -1e308)) FROM explanations
                          WHERE model = ? AND source = ? AND layer = ? GROUP BY unit""",
                       [key.model, key.source, key.layer]).fetchall()
    return {int(unit): text for unit, text in rows}


def read_snippets(con: duckdb.DuckDBPyConnection, key: LayerKey, before: int, after: int) -> pa.Table:
    """Per unit: its max, min and frequency, and the tokens around its top example's max token."""
    return query(con, """
        SELECT u.unit, u.max_activation, u.min_activation, u.frequency, e.max_position,
               greatest(e.max_position - ?, 0) AS snippet_start, len(c.tokens) AS context_length,
               list_slice(c.tokens, greatest(e.max_position - ?, 0) + 1, e.max_position + 1 + ?) AS snippet
        FROM units u
        LEFT JOIN examples e ON e.model = u.model AND e.source = u.source AND e.layer = u.layer
                             AND e.unit = u.unit AND e.example_kind = 'top' AND e.rank = 1
        LEFT JOIN contexts c ON c.context_id = e.context_id
        WHERE u.model = ? AND u.source = ? AND u.layer = ?
        ORDER BY u.unit""", [before, before, after, key.model, key.source, key.layer])
