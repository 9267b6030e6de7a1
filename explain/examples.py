"""What an explainer is shown and what a scorer is tested on, read from a store.

For each unit, as delphi splits a latent's examples:
- shown: its top examples (strongest first), each a window of tokens around its max token, with the tokens where
  the unit activates marked;
- held out, activating: its quantile examples (then its random ones) whose contexts were not shown and whose max
  passes the threshold, taken in turn from each interval, so the test spans weak to strong activations;
- held out, non-activating: its own examples whose max stays under the threshold (measured), then windows of
  other contexts the store holds that are none of this unit's examples (not measured: the store has a unit's
  activations only on its own examples; docs/explain.md says what that costs).

A token activates when its activation is above `highlight` x the unit's max: 0 for dictionary features (they fire
or not), 0.2 for neurons, residual dimensions and attention heads (which are rarely exactly zero).
Everything is drawn from a generator seeded by --seed and the unit, so a re-run shows the same prompts (and so
hits the cache).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import numpy as np

from featureatlas.errors import UsageError, setting_name
from featureatlas.store.addresses import (
    AddressError,
    SourceLayer,
    describe_sources,
    format_address,
    parse_address,
    store_sources,
)

DENSE_HIGHLIGHT = 0.2  # neurons, residual dimensions, heads: a token activates above this share of the unit's max
SPARSE_KINDS = ("sae", "transcoder")  # dictionary features: a token activates when the feature is non-zero


@dataclass(frozen=True)
class Unit:
    """A unit to explain, and what its store says of it."""

    model: str
    source: str
    layer: int
    unit: int
    kind: str
    max_activation: float | None
    several_models: bool = False

    @property
    def address(self) -> str:
        return format_address(self.model, self.source, self.layer, self.unit, with_model=self.several_models)


@dataclass
class Excerpt:
    """A window of a context: its tokens (BOS left out) and the unit's activation on each (None: not measured)."""

    tokens: list[str]
    activations: np.ndarray | None
    context_id: int

    def firing(self, threshold: float) -> np.ndarray:
        """Positions where the unit activates (none where it was not measured)."""
        if self.activations is None:
            return np.zeros(0, np.int64)
        return np.flatnonzero(self.activations > threshold)


@dataclass
class UnitExamples:
    """One unit's examples, split as the module says."""

    unit: Unit
    threshold: float
    shown: list[Excerpt]
    activating: list[Excerpt]
    non_activating: list[Excerpt]
    measured_negatives: int  # how many of non_activating are the unit's own examples (the rest are assumed)


def select_units(con: duckdb.DuckDBPyConnection, *, addresses: Sequence[str] = (), source: str | None = None,
                 layer: int | None = None, limit: int | None = None) -> list[Unit]:
    """The units --units names (in that order, repeats dropped), or those of --source/--layer in unit order
    (with --limit, the first that many that have examples)."""
    held = store_sources(con)
    if bool(addresses) == (source is not None):
        raise UsageError(f"pass either {setting_name('units')} ADDRESSES or {setting_name('source')} SOURCE (with "
                         f"{setting_name('layer')} when it has several)")
    if limit is not None and limit < 1:
        raise UsageError(f"{setting_name('limit')} {limit}: give at least 1")
    several = len({s.model for s in held}) > 1
    kinds = {(m, s, la): k for m, s, la, k in con.execute("SELECT model, source, layer, kind FROM sources").fetchall()}
    if addresses:
        found: dict[tuple[str, str, int, int], None] = {}
        for address in addresses:
            try:
                found[parse_address(address, held)] = None
            except AddressError as err:
                raise UsageError(f"{setting_name('units')}: {err}") from None
        keys = list(found)
    else:
        model, source, layer = _source_layer(held, source, layer)
        rows = con.execute("SELECT unit FROM units WHERE model = ? AND source = ? AND layer = ? AND n_examples > 0 "
                           "ORDER BY unit" + (" LIMIT ?" if limit else ""),
                           [model, source, layer] + ([limit] if limit else [])).fetchall()
        keys = [(model, source, layer, unit) for (unit,) in rows]
    maxima = _maxima(con, keys)
    return [Unit(*key, kind=kinds[key[:3]], max_activation=maxima.get(key), several_models=several) for key in keys]


def _source_layer(held: list[SourceLayer], source: str, layer: int | None) -> tuple[str, str, int]:
    """The (model, source, layer) that --source and --layer name."""
    matching = [s for s in held if s.source == source]
    if not matching:
        raise UsageError(f"{setting_name('source')} {source!r}: the store has no such source; it has "
                         f"{describe_sources(held)}")
    layers = sorted({s.layer for s in matching})
    if layer is None and len(layers) > 1:
        raise UsageError(f"{setting_name('source')} {source}: has several layers ({describe_sources(matching)}); "
                         f"pick one with {setting_name('layer')}")
    layer = layers[0] if layer is None else layer
    models = sorted({s.model for s in matching if s.layer == layer})
    if not models:
        raise UsageError(f"{setting_name('layer')} {layer}: the store has {describe_sources(matching)}; pick one of "
                         "those layers")
    if len(models) > 1:
        raise UsageError(f"{setting_name('source')} {source}, {setting_name('layer')} {layer}: held by several "
                         f"models; name units with {setting_name('units')} MODEL::{source}/{layer}/UNIT")
    return models[0], source, layer


def _maxima(con: duckdb.DuckDBPyConnection, keys: list[tuple[str, str, int, int]]) -> dict[tuple, float]:
    if not keys:
        return {}
    con.execute("CREATE OR REPLACE TEMP TABLE wanted (model VARCHAR, source VARCHAR, layer INTEGER, unit INTEGER)")
    con.executemany("INSERT INTO wanted VALUES (?, ?, ?, ?)", [list(k) for k in keys])
    rows = con.execute("SELECT model, source, layer, unit, max_activation FROM units JOIN wanted "
                       "USING (model, source, layer, unit)").fetchall()
    con.execute("DROP TABLE wanted")
    return {tuple(r[:4]): r[4] for r in rows if r[4] is not None and np.isfinite(r[4])}


class ExampleReader:
    """Reads units' examples from an open store (one thread at a time)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, *, shown: int, tested: int, window: int,
                 highlight: float | None, seed: int) -> None:
        if shown < 1 or tested < 0 or window < 2:
            raise UsageError(f"{setting_name('examples')} must be at least 1, {setting_name('test_examples')} at least "
                             f"0 and {setting_name('window')} at least 2")
        if highlight is not None and not 0 <= highlight < 1:
            raise UsageError(f"{setting_name('highlight')} {highlight}: give a share of the unit's max from 0 to "
                             "below 1")
        self.con, self.n_shown, self.n_tested, self.window = con, shown, tested, window
        self.highlight, self.seed = highlight, seed
        self.first = {m: int(bool(b)) for m, b in con.execute(
            "SELECT model, bool_or(bos_excluded) FROM runs GROUP BY model").fetchall()}
        self.context_ids = np.array([c for (c,) in con.execute("SELECT context_id FROM contexts").fetchall()],
                                    np.int64)

    def threshold(self, unit: Unit) -> float:
        share = self.highlight if self.highlight is not None else 0.0 if unit.kind in SPARSE_KINDS \
            else DENSE_HIGHLIGHT
        return max(0.0, share * (unit.max_activation or 0.0))

    def read(self, unit: Unit) -> UnitExamples:
        """The unit's shown, activating and non-activating excerpts (shown empty: it has no top examples)."""
        rng = np.random.default_rng([self.seed, unit.layer, unit.unit, zlib.crc32(f"{unit.model}\0{unit.source}"
                                                                                  .encode())])
        first = self.first.get(unit.model, 1)
        rows = self.con.execute(
            "SELECT e.example_kind, e.interval_lo, e.rank, e.context_id, e.max_position, e.max_activation, "
            "e.activations, c.tokens FROM examples e JOIN contexts c USING (context_id) "
            "WHERE e.model = ? AND e.source = ? AND e.layer = ? AND e.unit = ? "
            "AND e.example_kind IN ('top', 'quantile', 'random') ORDER BY e.example_kind, e.interval_lo DESC, e.rank",
            [unit.model, unit.source, unit.layer, unit.unit]).fetchall()
        threshold = self.threshold(unit)
        top = [r for r in rows if r[0] == "top" and r[5] is not None and r[5] > threshold][:self.n_shown]
        shown = [self._excerpt(r, first) for r in top]
        used = {r[3] for r in top}
        # held out: activating quantile examples, one from each interval in turn, then random ones
        intervals: dict[float, list] = {}
        for r in rows:
            if r[0] == "quantile" and r[3] not in used and r[5] > threshold:
                intervals.setdefault(r[1], []).append(r)
        pool = [r for group in _round_robin(list(intervals.values())) for r in group]
        pool += [r for r in rows if r[0] == "random" and r[3] not in used and r[5] > threshold]
        activating: list[Excerpt] = []
        for r in pool:
            if len(activating) >= self.n_tested:
                break
            if r[3] not in used:
                used.add(r[3])
                activating.append(self._excerpt(r, first))
        # non-activating: measured (the unit's own examples below the threshold), then assumed (other contexts)
        own = {r[3] for r in rows}
        non_activating = []
        for r in rows:
            if len(non_activating) >= len(activating):
                break
            if r[3] not in used and r[5] <= threshold:
                used.add(r[3])
                non_activating.append(self._excerpt(r, first, rng))
        measured = len(non_activating)
        non_activating += self._others(len(activating) - measured, own | used, first, rng)
        return UnitExamples(unit, threshold, shown, activating, non_activating, measured)

    def _excerpt(self, row: tuple, first: int, rng: np.random.Generator | None = None) -> Excerpt:
        """A window of an example: around its max (a quarter of the window after it), or, for a non-activating
        one (rng given), anywhere."""
        _, _, _, context_id, position, _, activations, tokens = row
        n = len(tokens)
        width = min(self.window, n - first)
        if rng is not None:
            start = first + int(rng.integers(0, n - first - width + 1))
        else:
            start = min(max(first, position - (self.window - self.window // 4) + 1), n - width)
        values = np.asarray(activations[start:start + width], np.float32)
        return Excerpt(list(tokens[start:start + width]), values, int(context_id))

    def _others(self, wanted: int, excluded: set[int], first: int, rng: np.random.Generator) -> list[Excerpt]:
        """`wanted` windows of contexts that are none of this unit's examples, drawn without replacement."""
        if wanted <= 0 or not len(self.context_ids):
            return []
        picked: list[int] = []
        for index in rng.permutation(len(self.context_ids)):
            context_id = int(self.context_ids[index])
            if context_id not in excluded:
                picked.append(context_id)
                if len(picked) == wanted:
                    break
        tokens = dict(self.con.execute("SELECT context_id, tokens FROM contexts WHERE context_id IN "
                                       f"({', '.join('?' * len(picked))})", picked).fetchall()) if picked else {}
        found = []
        for context_id in picked:
            context = tokens[context_id]
            if len(context) - first < 1:
                continue
            width = min(self.window, len(context) - first)
            start = first + int(rng.integers(0, len(context) - first - width + 1))
            found.append(Excerpt(list(context[start:start + width]), None, context_id))
        return found


def _round_robin(groups: list[list]) -> list[list]:
    """[[a1, a2], [b1], [c1, c2]] -> [[a1, b1, c1], [a2, c2]]: one from each group in turn."""
    rounds = []
    for i in range(max((len(g) for g in groups), default=0)):
        rounds.append([g[i] for g in groups if i < len(g)])
    return rounds
