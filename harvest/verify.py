"""`featureatlas verify`: re-run a seeded sample of a store's examples through the model and compare.

A store outlives the machine that harvested it, and a wrong hook, a mis-read dictionary, a writer bug or an edited
file would each give a plausible-looking catalogue. verify recomputes what the store claims through harvest's own
sources and Reader (reopened by harvest/reopen.py, in the run's dtype and batch layout), so it checks the store,
not a second implementation. What it checks and the tolerance: docs/large-runs.md#verify.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import torch
import tqdm

from featureatlas.errors import UsageError, setting_name
from featureatlas.harvest.config import VerifyConfig
from featureatlas.harvest.contexts import Context, make_batch
from featureatlas.harvest.harvester import Reader
from featureatlas.harvest.reopen import Run, dictionary_specs, read_runs, reopen, run_dtype
from featureatlas.store.encoding import round_trip, rounding_bound
from featureatlas.store.schema import open_store

# A value passes within rtol x the unit's largest |activation|: a reordered sum's error scales with its terms.
RTOL_FLOOR = 1e-5   # float32's accumulation-order noise over sums of thousands of terms through tens of layers
ULPS = 2            # units in the last place: what one rounding flip of an intermediate costs once propagated
_KINDS = ("top", "bottom", "quantile", "random")


def default_rtol(dtype: torch.dtype) -> float:
    """max(2 eps, 1e-5): float32 1e-5, bfloat16 0.0156, float16 0.00195."""
    return max(ULPS * torch.finfo(dtype).eps, RTOL_FLOOR)


@dataclass
class Mismatch:
    model: str
    source: str
    layer: int
    unit: int
    kind: str                # example kind, or 'statistics'
    rank: int | None         # quantile examples: within their interval
    interval: tuple[float, float] | None  # quantile examples' [lo, hi)
    context_id: int | None
    checks: list[str]        # what failed: activations, max_position, max_activation (against the stored
    #                          activations), recomputed_max, interval, fires, n_tokens, context
    max_abs_diff: float
    tolerance: float
    position: int | None     # where the largest difference is
    where: str               # one line for people


@dataclass
class VerifyReport:
    store: str
    n_examples: int
    n_sources: int
    n_units_counted: int     # units whose n_tokens was checked (all of them)
    n_exact: int             # examples whose activations recomputed bit for bit
    max_relative_diff: float  # largest |diff| / scale over all examples
    rtol: dict[str, float]   # per model
    mismatches: list[Mismatch]

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        n = len(self.mismatches)
        verdict = "all match" if self.ok else f"{n:,} mismatch{'es' if n != 1 else ''}"
        return (f"verified {self.n_examples:,} example{'s' if self.n_examples != 1 else ''} of {self.n_sources} "
                f"source{'s' if self.n_sources != 1 else ''}: {verdict}")

    def table(self, limit: int = 10) -> str:
        """The first mismatches as an aligned table."""
        header = ("source", "layer", "unit", "kind", "rank", "max |diff|", "where")
        rows = [(m.source, str(m.layer), str(m.unit), m.kind, _rank(m), f"{m.max_abs_diff:.3g}", m.where)
                for m in self.mismatches[:limit]]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
                 for r in [header, *rows]]
        if len(self.mismatches) > limit:
            lines.append(f"… and {len(self.mismatches) - limit:,} more (--json lists all)")
        return "\n".join(lines)

    def to_json(self) -> str:
        """Strict JSON: an infinite difference (a missing context, a length mismatch) is written as null."""
        report = {**asdict(self), "ok": self.ok, "summary": self.summary()}
        for m in report["mismatches"]:
            m["max_abs_diff"] = m["max_abs_diff"] if math.isfinite(m["max_abs_diff"]) else None
        return json.dumps(report, indent=2)


def _rank(m: Mismatch) -> str:
    if m.rank is None:
        return "-"
    return f"{m.rank} in [{m.interval[0]:.3g}, {m.interval[1]:.3g})" if m.interval else str(m.rank)


def verify(config: VerifyConfig) -> VerifyReport:
    """Sample, recompute, compare; the report lists every mismatch (an empty list: the store checks out)."""
    if config.sample < 0:
        raise UsageError(f"{setting_name('sample')} must be at least 0")
    con = open_store(config.store)
    try:
        runs: dict[str, list[Run]] = defaultdict(list)  # merged stores may hold several runs of one model
        for run in read_runs(con):
            runs[run.model].append(run)
        if config.model is not None and len(runs) > 1:
            raise UsageError(f"{config.store}: holds runs of {len(runs)} models ({', '.join(runs)}); "
                             f"{setting_name('model')} can only stand in for the model of a store of one")
        mismatches, n_units = _check_token_counts(con)
        sample = sample_examples(con, config.sample, config.seed)
        n_examples = n_exact = 0
        max_relative = 0.0
        rtols: dict[str, float] = {}
        keys = {name: [k for k in sample if k[0] == name] for name in runs}
        # Every recorded dictionary is checked before any model loads: a moved folder costs seconds, not minutes.
        specs = {name: dictionary_specs(con, name, config.saes) for name in runs if keys[name]}
        for name, model_runs in runs.items():
            if keys[name]:
                checked = _verify_run(con, model_runs, keys[name], specs[name], config)
                n_examples += checked.n
                n_exact += checked.exact
                max_relative = max(max_relative, checked.max_relative)
                rtols[name] = checked.rtol
                mismatches += checked.mismatches
        n_sources = len({(k[0], k[1]) for k in sample})
        mismatches.sort(key=lambda m: (m.model, m.source, m.layer, m.unit, _KINDS.index(m.kind) if m.kind in _KINDS
                                       else -1, m.interval or (0.0, 0.0), m.rank or 0))
        return VerifyReport(str(config.store), n_examples, n_sources, n_units, n_exact, max_relative, rtols,
                            mismatches)
    finally:
        con.close()


def _check_token_counts(con: duckdb.DuckDBPyConnection) -> tuple[list[Mismatch], int]:
    """Every unit counted every token of its run: statistics are over all counted tokens, never a sample."""
    n_units = con.execute("SELECT count(*) FROM statistics").fetchone()[0]
    wrong = con.execute(  # a unit belongs to one of its model's runs (several, side by side, in a merged store)
        "SELECT s.model, s.source, s.layer, s.unit, s.n_tokens, (SELECT list(n_tokens ORDER BY run_id) FROM runs r "
        "WHERE r.model = s.model) AS counted FROM statistics s WHERE NOT list_contains(counted, s.n_tokens) "
        "ORDER BY ALL").fetchall()
    return [Mismatch(model, source, layer, unit, "statistics", None, None, None, ["n_tokens"],
                     float(min((abs(n - c) for c in counted), default=n)), 0.0, None,
                     f"n_tokens {n:,}, but the run counted {' or '.join(f'{c:,}' for c in counted) or 'no'} tokens")
            for model, source, layer, unit, n, counted in wrong], n_units


# -- sampling --------------------------------------------------------------------------------------------------

def sample_examples(con: duckdb.DuckDBPyConnection, n: int, seed: int) -> list[tuple]:
    """n examples (all if fewer), without replacement, stratified at each level: sources (model, source name),
    their layers, example kinds, units, each taken in turn in a seeded random order (so counts differ by at most
    one where there are enough), and within a unit one of its examples at random. A store's 46,080 neurons then do
    not crowd out its SAE's features, nor one unit's examples the others'. Keys: (model, source, layer,
    example_kind, unit, interval_lo, rank), quantile ranks counting within their interval. The same store and seed
    give the same sample."""
    rng = np.random.default_rng(seed)

    def shuffled(items: list) -> deque:
        return deque(items[i] for i in rng.permutation(len(items)))

    tree: dict = {}
    for model, source, layer, kind in con.execute(
            "SELECT model, source, layer, example_kind FROM examples GROUP BY ALL ORDER BY ALL").fetchall():
        tree.setdefault((model, source), {}).setdefault(layer, []).append((kind, None))  # units: loaded when drawn
    sources = shuffled([(top, shuffled([(layer, shuffled(kinds)) for layer, kinds in layers.items()]))
                        for top, layers in tree.items()])
    chosen: list[tuple] = []
    while len(chosen) < n and sources:
        top, layers = sources.popleft()
        layer, kinds = layers.popleft()
        kind, units = kinds.popleft()
        if units is None:
            units = shuffled([(unit, [tuple(r.values()) for r in examples]) for unit, examples in con.execute(
                "SELECT unit, list({'lo': interval_lo, 'rank': rank} ORDER BY interval_lo, rank) FROM examples "
                "WHERE model = ? AND source = ? AND layer = ? AND example_kind = ? GROUP BY unit ORDER BY unit",
                [*top, layer, kind]).fetchall()])
        unit, examples = units.popleft()
        lo, rank = examples.pop(int(rng.integers(len(examples))))
        chosen.append((*top, layer, kind, unit, lo, rank))
        for queue, item, left in ((units, (unit, examples), examples), (kinds, (kind, units), units),
                                  (layers, (layer, kinds), kinds), (sources, (top, layers), layers)):
            if left:  # back to the end of its turn, unless exhausted
                queue.append(item)
    return chosen


# -- one run ---------------------------------------------------------------------------------------------------

@dataclass
class _Checked:
    n: int = 0
    exact: int = 0
    max_relative: float = 0.0
    rtol: float = 0.0
    mismatches: list[Mismatch] = field(default_factory=list)


@dataclass
class _Example:
    source: str
    layer: int
    unit: int
    kind: str
    rank: int
    context_id: int
    position: int
    value: float
    activations: np.ndarray
    interval: tuple[float | None, float | None]
    scale: float  # the unit's largest |activation| in the store


def _verify_run(con: duckdb.DuckDBPyConnection, runs: list[Run], keys: list[tuple], specs: list[str],
                config: VerifyConfig) -> _Checked:
    """One model's sampled examples. Several runs of it (a merged store) are run with the first's dtype and
    checked with the coarsest one's tolerance; which run a source came from is not recorded."""
    run = runs[0]
    reopened = reopen(con, Path(config.store), run, model=config.model, saes=config.saes, device=config.device,
                      specs=specs)
    model, tokenizer, sources, device = reopened.model, reopened.tokenizer, reopened.sources, reopened.device

    examples = _fetch_examples(con, run.model, keys)
    contexts = _fetch_contexts(con, {e.context_id for e in examples})
    needed = sorted({(e.source, e.layer) for e in examples})
    reader_sources = [sources[k] for k in needed]
    units = {k: sorted({e.unit for e in examples if (e.source, e.layer) == k}) for k in needed}
    column = {k: {u: i for i, u in enumerate(us)} for k, us in units.items()}
    coarsest = max(default_rtol(run_dtype(r.dtype, device, Path(config.store))) for r in runs)
    rtol = config.rtol if config.rtol is not None else coarsest
    rtols = {k: max(rtol, default_rtol(s.dictionary.dtype)) if s.dictionary is not None and config.rtol is None
             else rtol for k, s in zip(needed, reader_sources, strict=True)}
    checked = _Checked(rtol=rtol)
    by_context: dict[int, list[_Example]] = defaultdict(list)
    for e in examples:
        if e.context_id in contexts:
            by_context[e.context_id].append(e)
        else:
            checked.n += 1
            checked.mismatches.append(_mismatch(run.model, e, ["context"], math.inf, 0.0, None,
                                                f"context {e.context_id} is not in the contexts view"))

    has_bos = bool(run.bos_excluded)
    first = int(has_bos)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    index = {k: torch.tensor(units[k], device=device) for k in needed}
    captured: dict[tuple[str, int], torch.Tensor] = {}

    def consume(i: int, acts: torch.Tensor) -> None:
        key = needed[i]
        captured[key] = acts[:, :, index[key]].float().cpu()

    reader = Reader(model, reader_sources, consume)
    bar = tqdm.tqdm(total=len(examples), initial=checked.n, unit="ex", desc="verify", disable=not config.progress,
                    dynamic_ncols=True)
    try:
        layout = harvest_layout(con, run) if len(runs) == 1 else None
        if layout is not None and any(layout.shape(cid) is None or layout.lengths[cid] != len(c.token_ids)
                                      for cid, c in contexts.items()):
            layout = None  # the documents say otherwise than the contexts: batch them as they come
        for batch_contexts in _batches([contexts[c] for c in sorted(by_context)], layout, run.batch_size):
            captured.clear()
            reader.run(make_batch(batch_contexts, has_bos, pad_id))
            for row, context in enumerate(batch_contexts):
                for e in by_context.get(context.context_id, []):  # fillers (id -1) have none
                    key = (e.source, e.layer)
                    length = len(context.token_ids)
                    recomputed = captured[key][row, :length, column[key][e.unit]].double().numpy()
                    _compare(run.model, e, recomputed, length, first, rtols[key], context, checked)
                    bar.update(1)
    finally:
        reader.detach()
        bar.close()
    return checked


def _fetch_examples(con: duckdb.DuckDBPyConnection, model: str, keys: list[tuple]) -> list[_Example]:
    columns = ("model", "source", "layer", "example_kind", "unit", "interval_lo", "rank")
    wanted = pa.table({name: pa.array([k[i] for k in keys], pa.float32() if name == "interval_lo" else None)
                       for i, name in enumerate(columns)})
    con.register("verify_wanted", wanted)
    try:
        rows = con.execute(
            "SELECT e.source, e.layer, e.unit, e.example_kind, e.rank, e.context_id, e.max_position, "
            "e.max_activation, e.activations, e.interval_lo, e.interval_hi, "
            "greatest(abs(coalesce(u.max_activation, 0)), abs(coalesce(u.min_activation, 0))) "
            "FROM examples e JOIN verify_wanted w ON e.model = w.model AND e.source = w.source AND "
            "e.layer = w.layer AND e.example_kind = w.example_kind AND e.unit = w.unit AND e.rank = w.rank AND "
            "e.interval_lo IS NOT DISTINCT FROM w.interval_lo "
            "JOIN units u ON u.model = e.model AND u.source = e.source AND u.layer = e.layer AND u.unit = e.unit "
            "WHERE e.model = ? "
            "ORDER BY e.source, e.layer, e.unit, e.example_kind, e.rank", [model]).fetchall()
    finally:
        con.unregister("verify_wanted")
    return [_Example(source, layer, unit, kind, rank, context_id, position, value,
                     np.asarray(acts, dtype=np.float64), (lo, hi), float(scale))
            for source, layer, unit, kind, rank, context_id, position, value, acts, lo, hi, scale in rows]


def _fetch_contexts(con: duckdb.DuckDBPyConnection, ids: set[int]) -> dict[int, Context]:
    con.register("verify_contexts", pa.table({"context_id": pa.array(sorted(ids), pa.int64())}))
    try:
        rows = con.execute("SELECT context_id, document_id, start_token, token_ids, tokens FROM contexts "
                           "JOIN verify_contexts USING (context_id)").fetchall()
    finally:
        con.unregister("verify_contexts")
    return {cid: _Shown(cid, doc, start, list(ids), tokens) for cid, doc, start, ids, tokens in rows}


@dataclass(frozen=True)
class _Shown(Context):
    tokens: list[str] = field(default_factory=list)  # display strings, for the report


# -- batch layout ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """How harvest batched its contexts: every context's length by id, and the ids it ran in order."""

    lengths: np.ndarray
    order: np.ndarray        # increasing: all ids, or a shard's (id = i mod n)
    batch_size: int

    def shape(self, context_id: int) -> tuple[int, int, bool] | None:
        """(rows, width, padded) of the harvest batch that held the context; None if the run never had it."""
        k = int(np.searchsorted(self.order, context_id))
        if k >= len(self.order) or self.order[k] != context_id:
            return None
        start = k - k % self.batch_size
        lengths = self.lengths[self.order[start:start + self.batch_size]]
        return len(lengths), int(lengths.max()), bool((lengths < lengths.max()).any())


def harvest_layout(con: duckdb.DuckDBPyConnection, run: Run) -> Layout | None:
    """Each context's length rebuilt from the documents view (harvest cuts every document into pieces of
    context_length - BOS tokens, numbering contexts in document order; a `--shard I/N` store ran the ids = I mod N),
    so each context's harvest batch and its shape are known. None when the documents do not add up to the run's
    contexts (a merged store's shards, say)."""
    n_tokens = np.array([n for (n,) in con.execute(
        "SELECT n_tokens FROM documents ORDER BY document_id").fetchall()], dtype=np.int64)
    bos = int(bool(run.bos_excluded))
    body = run.context_length - bos
    if body < 1 or len(n_tokens) == 0 or (n_tokens < 1).any():
        return None
    pieces = -(-n_tokens // body)
    lengths = np.full(int(pieces.sum()), run.context_length, dtype=np.int64)
    last = np.cumsum(pieces) - 1
    lengths[last] = n_tokens - (pieces - 1) * body + bos
    order = np.arange(len(lengths))
    shard = json.loads(run.settings or "{}").get("shard")
    if isinstance(shard, list) and len(shard) == 2 and all(isinstance(x, int) for x in shard) and shard[1] > 0:
        order = order[shard[0]::shard[1]]
    elif shard is not None:
        return None
    return Layout(lengths, order, run.batch_size) if len(order) == run.n_contexts else None


def _batches(contexts: list[Context], layout: Layout | None, batch_size: int) -> list[list[Context]]:
    """The contexts in batches shaped as harvest's were: the same rows and width, padded (so masked) only where
    harvest's batch was. Rows beyond the sampled contexts are fillers (context_id -1): under causal attention and
    right padding they change nothing in the others' rows, but they keep the matmuls' shapes, hence their bits."""
    groups: dict[tuple[int, int, bool | None], list[Context]] = defaultdict(list)
    for c in contexts:
        shape = layout.shape(c.context_id) if layout is not None else None
        if shape is not None:
            groups[shape].append(c)
        else:  # no layout known: full batches as wide as the contexts, as they come
            groups[batch_size, 0, None].append(c)
    batches = []
    for (rows, width, padded), members in sorted(groups.items(), key=lambda g: g[1][0].context_id):
        width = width or max(len(c.token_ids) for c in members)
        pending = members
        while pending:
            take = min(rows, len(pending))
            while take > 1 and take + len(_fillers(pending[:take], width, padded)) > rows:
                take -= 1
            batch = pending[:take] + _fillers(pending[:take], width, padded)
            long = _filler(batch[0], width)
            batches.append(batch + [long] * (rows - len(batch)))
            pending = pending[take:]
    return batches


def _fillers(rows: list[Context], width: int, padded: bool | None) -> list[Context]:
    """What the rows need so the batch is `width` wide and padded exactly when harvest's was."""
    extra = []
    if not any(len(c.token_ids) == width for c in rows):
        extra.append(_filler(rows[0], width))
    if padded and all(len(c.token_ids) == width for c in rows):
        extra.append(Context(-1, -1, 0, rows[0].token_ids[:1]))
    return extra


def _filler(like: Context, width: int) -> Context:
    ids = like.token_ids
    return Context(-1, -1, 0, (ids * (width // len(ids) + 1))[:width])


# -- comparison ------------------------------------------------------------------------------------------------

def _compare(model: str, e: _Example, recomputed: np.ndarray, length: int, first: int, rtol: float,
             context: Context, checked: _Checked) -> None:
    checked.n += 1
    stored = e.activations
    if len(stored) != length:
        checked.mismatches.append(_mismatch(model, e, ["activations"], math.inf, 0.0, None,
                                            f"context {e.context_id}: {len(stored)} activations stored for "
                                            f"{length} tokens"))
        return
    scale = max(e.scale, float(np.abs(stored).max(initial=0.0)))
    tolerance = rtol * scale
    largest = max(float(np.abs(v[np.isfinite(v)]).max(initial=0.0)) for v in (stored, recomputed))
    rounded = tolerance + float(rounding_bound(largest))  # per-token activations: plus the store's own rounding
    diff = np.abs(stored - recomputed)
    at = int(diff.argmax())
    worst = float(diff[at])
    checked.exact += np.array_equal(round_trip(recomputed.astype(np.float32), e.value), stored.astype(np.float32),
                                    equal_nan=True)
    if scale > 0:
        checked.max_relative = max(checked.max_relative, worst / scale)
    tokens = getattr(context, "tokens", None) or []

    def token(p: int) -> str:
        return f"position {p}" + (f" {tokens[p]!r}" if p < len(tokens) else "")

    failed, notes = [], []
    if not worst <= rounded:  # NaN fails too
        failed.append("activations")
        notes.append(f"{token(at)}: stored {stored[at]:.6g}, recomputed {recomputed[at]:.6g}")
    bottom = e.kind == "bottom"
    counted = stored[first:]
    if len(counted):
        extreme_at = int(counted.argmin() if bottom else counted.argmax()) + first
        extreme = float(np.float32(stored[extreme_at]))
        if e.position != extreme_at or float(np.float32(e.value)) != extreme:
            failed += [name for name, bad in (("max_position", e.position != extreme_at),
                                              ("max_activation", float(np.float32(e.value)) != extreme)) if bad]
            notes.append(f"max_activation {e.value:.6g} at max_position {e.position}, but the stored activations' "
                         f"{'min' if bottom else 'max'} is {extreme:.6g} at {token(extreme_at)}")
        again = recomputed[first:]
        again_at = int(again.argmin() if bottom else again.argmax()) + first
        gap = abs(float(recomputed[again_at]) - e.value)
        if not gap <= tolerance:
            failed.append("recomputed_max")
            worst, at = max(worst, gap), at if worst >= gap else again_at
            notes.append(f"recomputed {'min' if bottom else 'max'} {recomputed[again_at]:.6g} at "
                         f"{token(again_at)}, stored {e.value:.6g}")
    lo, hi = e.interval
    if e.kind == "quantile" and lo is not None and hi is not None and not lo <= e.value < hi:
        failed.append("interval")
        notes.append(f"max {e.value:.6g} outside its interval [{lo:.6g}, {hi:.6g})")
    if e.kind in ("quantile", "random") and not e.value > 0:
        failed.append("fires")
        notes.append(f"max {e.value:.6g}: a {e.kind} example must fire (max > 0)")
    if failed:
        allowed = rounded if "activations" in failed else tolerance
        checked.mismatches.append(_mismatch(model, e, failed, worst, allowed, at,
                                            f"context {e.context_id}, " + "; ".join(notes)))


def _mismatch(model: str, e: _Example, checks: list[str], diff: float, tolerance: float, position: int | None,
              where: str) -> Mismatch:
    interval = e.interval if e.kind == "quantile" and None not in e.interval else None
    return Mismatch(model, e.source, e.layer, e.unit, e.kind, e.rank, interval, e.context_id, checks, diff,
                    tolerance, position, where)
