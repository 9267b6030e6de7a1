"""Synthetic stores, shared by the tests (conftest.py) and the site benchmark (bench/site.py).

`make_store`: small, deterministic, realistic in shape and full of hostile strings, for the site tests.
`make_large_store`: a harvest-sized store (100,000 units in well under a minute), built with numpy and Arrow
columns only, for benchmarking `featureatlas build`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from featureatlas.harvest.config import CONTEXT_LENGTH, HarvestConfig
from featureatlas.store.writer import StoreWriter

BOS = "<|im_start|>"
MODEL = 'Tiny "LM" <b>v1</b>/../x'
NASTY_TOKENS = [
    "<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "</textarea>", "a\x00b", "\u202eevil",
    "\n", "\n\n", "  ", "\t", " \n", "&amp;", "'", "<!--", "{{ 7*7 }}", "\u2066x\u2069", "javascript:alert(1)",
]
PLAIN_TOKENS = [" the", " cat", " sat", " on", " a", " mat", ".", ",", " and", " dog", "ing", " of", "\u00e9t\u00e9"]
DOC_NAMES = ['<img src=x onerror=alert(2)>.txt', "plain.txt", "poems.jsonl:7", "\u202egnp.exe"]
# The vocabulary logit effects refer to (by index); MISSING_TOKEN_ID is an id the vocabulary table lacks.
LOGIT_VOCAB = NASTY_TOKENS + PLAIN_TOKENS
MISSING_TOKEN_ID = 9999
N_LOGITS = 10
SAE_PATH = "/data/saes/<b>res</b>\u202e/layer_1"
SAE_CONFIG = {"architecture": "jumprelu", "d_in": 64, "hook_name": "blocks.1.hook_resid_post",
              "note": "</pre><script>alert(3)</script>", "bidi": "\u202eevil", "nested": {"k": [1, 2, 3]}}
CONTEXTS_SEEN = 25_000  # contexts the synthetic harvest ran over; only those kept as examples are stored
SAMPLES = 4_000  # activations drawn per unit for its statistics and histogram
# Units with something special, per source (see make_store).
NEVER_SEEN, ONLY_NEGATIVE, FEW_EXAMPLES, RESID_OUTLIER, DEAD_FEATURE = 3, 4, 5, 9, 3


@dataclass(frozen=True)
class SourceSpec:
    """How one synthetic source is shaped: which layers, how many units, and how its units behave."""

    name: str
    kind: str
    signed: bool
    layers: tuple[int, ...]
    n_units: int
    histogram_every: int = 1  # as the harvest: neurons and residual dimensions sample contexts, features do not


def source_specs(names: tuple[str, ...], n_layers: int, n_units: int) -> list[SourceSpec]:
    """MLP neurons and residual dimensions on every layer; the SAE, twice as wide, on the last layer only."""
    specs = {"mlp": SourceSpec("mlp", "mlp", False, tuple(range(n_layers)), n_units, histogram_every=8),
             "resid": SourceSpec("resid", "resid", True, tuple(range(n_layers)), n_units, histogram_every=8),
             "sae:res": SourceSpec("sae:res", "sae", False, (n_layers - 1,), 2 * n_units)}
    return [specs[name] for name in names]


def histogram_bin(values: np.ndarray) -> np.ndarray:
    """The store's histogram bin of each value, as schema.sql documents it (0 exact zero, sign by side)."""
    magnitude = np.abs(values)
    with np.errstate(divide="ignore"):
        octave = np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
    quarter = np.floor((magnitude / 2.0 ** octave - 1) * 4)
    bins = np.clip(2 + 4 * (octave + 16) + quarter, 2, 130)
    bins[magnitude < 2.0 ** -16] = 1
    return (np.sign(values) * bins).astype(np.int64)


def _samples(spec: SourceSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each unit's activations as [units, SAMPLES] draws of its non-zero values, and [units] the share of
    tokens where it is exactly zero (SAE features are sparse: most tokens)."""
    shape = (spec.n_units, SAMPLES)
    scale = rng.lognormal(0.0, 0.5, (spec.n_units, 1))
    zero = np.zeros(spec.n_units)
    if spec.kind == "mlp":  # SiLU-like: many small negatives, a positive tail
        x = rng.normal(-1.5, 1.3, shape)
        values = x / (1 + np.exp(-x)) * scale
        values[ONLY_NEGATIVE] = -np.abs(values[ONLY_NEGATIVE]) - 0.5
    elif spec.kind == "resid":
        scale[RESID_OUTLIER:RESID_OUTLIER + 1] *= 60  # the massive-activation dimension LLM residual streams have
        values = rng.standard_normal(shape) * scale
    else:  # an SAE feature: non-negative, firing on 0.1% to 10% of tokens
        values = rng.lognormal(-0.5, 0.7, shape) * scale
        zero = 1 - 10 ** rng.uniform(-3, -1, spec.n_units)
        zero[DEAD_FEATURE] = 1
    return values, zero


@dataclass
class ExampleSet:
    """Examples of one kind, as add_examples takes them."""

    units: list[int]
    ranks: list[int]
    values: list[float]
    intervals: list[tuple[float, float]]


def _descending(n: int, rng: np.random.Generator) -> np.ndarray:
    """n shares of an extreme, the first exactly 1, falling to no less than 0.6."""
    return np.concatenate([[1.0], np.sort(rng.uniform(0.6, 1.0, n - 1))[::-1]])


def _example_sets(samples: np.ndarray, spec: SourceSpec, k: int, n_intervals: int, per_interval: int,
                  n_random: int, rng: np.random.Generator) -> dict[str, ExampleSet]:
    """Each unit's top (and bottom, if signed), quantile and random examples: their values and ranks."""
    sets = {kind: ExampleSet([], [], [], []) for kind in ("top", "bottom", "quantile", "random")}

    def add(kind: str, unit: int, values: np.ndarray, intervals: list[tuple[float, float]] | None = None) -> None:
        s = sets[kind]
        s.units += [unit] * len(values)
        s.ranks += list(range(1, len(values) + 1))
        s.values += [float(v) for v in values]
        s.intervals += intervals or [(np.nan, np.nan)] * len(values)

    for unit, row in enumerate(samples):
        top = row.max() * rng.uniform(1.2, 1.6)
        if spec.kind == "mlp" and unit == NEVER_SEEN or spec.kind == "sae" and unit == DEAD_FEATURE:
            continue
        if spec.kind == "mlp" and unit == ONLY_NEGATIVE:
            add("top", unit, -np.sort(rng.uniform(0.1, 1.0, k)))
            continue
        n_top = 2 if unit == FEW_EXAMPLES else k
        add("top", unit, _descending(n_top, rng) * top)
        if spec.signed:
            add("bottom", unit, _descending(n_top, rng) * row.min() * rng.uniform(1.2, 1.6))
        edges = np.linspace(0, top, n_intervals + 1)
        for lo, hi in zip(edges[::-1][1:], edges[::-1][:-1], strict=True):  # highest interval first
            add("quantile", unit, rng.uniform(max(lo, top * 1e-3), hi, per_interval), [(lo, hi)] * per_interval)
        firing = row[row > 0]
        add("random", unit, rng.choice(firing, min(n_random, len(firing)), replace=False) if len(firing) else [])
    return sets


def _activations(example_set: ExampleSet, kind: str, samples: np.ndarray, zero: np.ndarray, context_length: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-token activations [n, context_length]: the unit's own activations (more often non-zero than usual,
    as around a sparse feature's peak), capped so the example's value, at the returned position, is its extreme
    (max, or min for bottom examples); BOS gets the large activation an attention sink has."""
    units, values = np.array(example_set.units), np.array(example_set.values)
    n = len(values)
    acts = samples[units[:, None], rng.integers(0, samples.shape[1], (n, context_length))]
    acts = np.where(rng.random((n, context_length)) < np.maximum(1 - zero[units], 0.1)[:, None], acts, 0.0)
    if kind == "bottom":
        acts = np.maximum(acts, values[:, None] * 0.9)
    else:
        acts = np.minimum(acts, np.where(values > 0, values * 0.9, values - np.abs(values) - 1.5)[:, None])
    positions = rng.integers(1, context_length, n)
    acts[np.arange(n), positions] = values
    acts[:, 0] = np.abs(values) * 3
    return acts.astype(np.float32), positions


def _unit_statistics(samples: np.ndarray, zero: np.ndarray, sets: dict[str, ExampleSet], spec: SourceSpec,
                     n_tokens: int) -> dict:
    """add_units arguments consistent with the samples and with the examples' extremes."""
    n, active = spec.n_units, 1 - zero
    maxima = np.where(active > 0, samples.max(axis=1), 0.0)
    minima = np.where(active > 0, samples.min(axis=1), 0.0)
    for kind, extreme in (("top", np.maximum), ("bottom", np.minimum)):
        units, values = np.array(sets[kind].units, int), np.array(sets[kind].values)
        if kind == "top":
            maxima[units] = values  # the top example's max is the unit's max; other ranks are lower
        extreme.at(minima if kind == "bottom" else maxima, units, values)
    maxima = np.where(zero > 0, np.maximum(maxima, 0), maxima)
    minima = np.where(zero > 0, np.minimum(minima, 0), minima)
    stats = {"max_activation": maxima, "min_activation": minima, "n_tokens": np.full(n, n_tokens),
             "n_firing": np.round(active * (samples > 0).mean(axis=1) * n_tokens).astype(np.int64),
             "sum_activation": active * samples.mean(axis=1) * n_tokens,
             "sum_squares": active * (samples ** 2).mean(axis=1) * n_tokens,
             "n_examples": np.bincount(np.array(sets["top"].units, int), minlength=n)}
    if spec.kind == "mlp":  # a unit the harvest never saw has no statistics at all
        for name in ("max_activation", "min_activation"):
            stats[name][NEVER_SEEN] = np.nan
        for name in ("n_tokens", "n_firing", "sum_activation", "sum_squares"):
            stats[name][NEVER_SEEN] = 0
    return stats


def _histogram_counts(samples: np.ndarray, zero: np.ndarray, stats: dict, spec: SourceSpec,
                      n_tokens: int) -> np.ndarray:
    """[units, 261] counts: the samples' bins (and the extremes) scaled up to the tokens the histogram counted."""
    counted = n_tokens / spec.histogram_every
    extremes = np.nan_to_num(np.stack([stats["max_activation"], stats["min_activation"]], 1))
    counts = np.zeros((spec.n_units, 261), np.int64)
    for values, weight in ((samples, (1 - zero) * counted / SAMPLES), (extremes, np.full(spec.n_units, 1e-9))):
        bins = histogram_bin(values) + 130
        sampled = np.zeros_like(counts)
        np.add.at(sampled, (np.repeat(np.arange(spec.n_units), bins.shape[1]), bins.ravel()), 1)
        seen = (sampled > 0) & (weight[:, None] > 0)  # each sampled bin counts at least once
        counts += np.where(seen, np.maximum(np.round(sampled * weight[:, None]), 1), 0).astype(np.int64)
    counts[:, 130] += np.round(zero * counted).astype(np.int64)
    if spec.kind == "mlp":
        counts[NEVER_SEEN] = 0  # no row content: the page says there is no histogram
    return counts


def _logits(spec: SourceSpec, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Top and bottom N_LOGITS token ids with effects, strongest first; unit 0 promotes the hostile tokens,
    unit 1's suppressed list has an id the vocabulary lacks."""
    ids = np.stack([rng.permutation(len(LOGIT_VOCAB))[:2 * N_LOGITS] for _ in range(spec.n_units)])
    ids[0] = np.arange(2 * N_LOGITS)
    ids[1, -1] = MISSING_TOKEN_ID
    effects = np.sort(np.abs(rng.standard_normal((spec.n_units, 2 * N_LOGITS))), axis=1)[:, ::-1] + 0.05
    return {"top": (ids[:, :N_LOGITS], effects[:, :N_LOGITS]),
            "bottom": (ids[:, N_LOGITS:], -effects[:, N_LOGITS:] * 0.8)}


def _add_source_layer(store: StoreWriter, model: str, spec: SourceSpec, layer: int, context_length: int,
                      n_contexts: int, k: int, quantiles: tuple[int, int], n_random: int,
                      rng: np.random.Generator) -> None:
    n_tokens = CONTEXTS_SEEN * (context_length - 1)
    hook = f"model.layers.{layer}.mlp.down_proj:input" if spec.kind == "mlp" else f"model.layers.{layer}:output"
    hook_name = f"blocks.{layer}.mlp.hook_post" if spec.kind == "mlp" else f"blocks.{layer}.hook_resid_post"
    dictionary = ({"dictionary_path": SAE_PATH, "dictionary_format": "saelens", "architecture": "jumprelu",
                   "config": SAE_CONFIG} if spec.kind == "sae" else {})
    store.add_source(model, spec.name, layer, spec.n_units, hook, kind=spec.kind, hook_name=hook_name,
                     signed=spec.signed, histogram_every=spec.histogram_every, **dictionary)
    samples, zero = _samples(spec, rng)
    sets = _example_sets(samples, spec, k, *quantiles, n_random, rng)
    stats = _unit_statistics(samples, zero, sets, spec, n_tokens)
    store.add_units(model, spec.name, layer, **stats)
    store.add_histograms(model, spec.name, layer, _histogram_counts(samples, zero, stats, spec, n_tokens))
    for kind, example_set in sets.items():
        if not example_set.units:
            continue
        acts, positions = _activations(example_set, kind, samples, zero, context_length, rng)
        intervals = np.array(example_set.intervals, np.float32)
        store.add_examples(model, spec.name, layer, kind, units=np.array(example_set.units),
                           ranks=np.array(example_set.ranks), context_ids=rng.integers(0, n_contexts, len(acts)),
                           positions=positions, values=np.array(example_set.values), activations=acts,
                           context_lengths=np.full(len(acts), context_length),
                           **({"interval_lo": intervals[:, 0], "interval_hi": intervals[:, 1]}
                              if kind == "quantile" else {}))
    if spec.kind != "mlp" or layer > 0:  # MLP layer 0 has no logit effects: the page must say so
        for polarity, (ids, effects) in _logits(spec, rng).items():
            store.add_logits(model, spec.name, layer, polarity, ids, effects)


def make_store(path: Path, n_layers: int = 2, n_units: int = 50, k: int = 5, context_length: int = 16,
               n_contexts: int = 120, vocabulary: list[str] | None = None, seed: int = 0,
               models: tuple[str, ...] = (MODEL,), sources: tuple[str, ...] = ("mlp", "resid", "sae:res"),
               quantiles: tuple[int, int] = (3, 2), n_random: int = 4) -> Path:
    """A store like a real harvest, scaled down: one run per model over shared contexts (each starting with
    BOS, nasty tokens common), and per source its units' statistics, histograms, logit effects and examples:
    top k, bottom k (signed sources), `quantiles` = (intervals, examples each), n_random random.

    Special units: MLP unit 3 was never seen (no statistics, histogram or examples), unit 4 is never positive,
    unit 5 has fewer than k examples (in every source); residual dimension 9 is a massive outlier; SAE feature 3
    is dead (never fired). MLP layer 0 has no logit effects."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary or (PLAIN_TOKENS * 3 + NASTY_TOKENS)
    tokens = [[BOS] + [vocab[i] for i in rng.integers(0, len(vocab), context_length - 1)]
              for _ in range(n_contexts)]
    with StoreWriter(path) as store:
        for run_id, model in enumerate(models, start=1):
            store.add_run(
                run_id=run_id, model=model, model_ref="tiny/lm", model_type="llama", corpus="corpus/<b>docs</b>",
                n_documents=len(DOC_NAMES), n_contexts=CONTEXTS_SEEN, n_tokens=CONTEXTS_SEEN * (context_length - 1),
                context_length=context_length, top_k=k, layers=list(range(n_layers)), batch_size=8,
                dtype="float32", device="cpu", bos_token=BOS, bos_excluded=True, seed=seed, settings={"seed": seed},
                versions={"torch": "x"}, started_at=datetime(2025, 1, 2, 3, 4),
                finished_at=datetime(2025, 1, 2, 4, 5), tokens_per_second=1e4)
            store.add_vocabulary(model, np.arange(len(LOGIT_VOCAB)), LOGIT_VOCAB)
        store.add_documents(np.arange(len(DOC_NAMES)), DOC_NAMES, np.full(len(DOC_NAMES), 1000))
        store.add_contexts(np.arange(n_contexts), np.arange(n_contexts) % len(DOC_NAMES),
                           np.arange(n_contexts) * 10, [[1] * context_length] * n_contexts, tokens)
        for model in models:
            for spec in source_specs(sources, n_layers, n_units):
                for layer in spec.layers:
                    _add_source_layer(store, model, spec, layer, context_length, n_contexts, k, quantiles, n_random,
                                      rng)
    return path


# --- make_large_store: a harvest-sized store for bench/site.py -------------------------------------------------
# Everything below is generated per (source, layer) and per chunk of units as whole numpy arrays and inserted as
# Arrow columns: there is no Python loop per unit or per example, so 100,000 units take seconds, not minutes.

LARGE_MODEL = "SmolLM2-135M (synthetic)"
MLP_WIDTH, RESID_WIDTH = 1536, 576  # SmolLM2-135M's MLP and residual widths
SAE_SHARE = 16_384 / 100_000  # a 16,384-feature dictionary in a 100,000-unit store
SAE_LAYER = 15  # the dictionary reads this layer's residual stream (or the last layer, in smaller stores)
CONTEXTS_PER_DOCUMENT = 64  # the last context of each document is shorter, as a harvest's are
DEAD_SHARE = 0.01  # SAE features that never fired: no examples, a histogram of zeros only
CHUNK = 2048  # units whose examples are made and inserted together: bounded memory, few inserts
POOL = 1 << 20  # background activations drawn once, then read as random windows (cheaper than per-token draws)
HOSTILE_TOKENS = list(dict.fromkeys(NASTY_TOKENS + [
    "<script>", "</script>", '"><img src=x onerror=alert(1)>', "\u202e", "\x00", "<", ">", "&", '"', "</div>",
    "${x}", "\\", "\r", "\r\n", "\u200b", "\ufeff", "\U0001f642", "\u65e5\u672c", "\u00e9", " ", "\n\n\n"]))


@dataclass(frozen=True)
class LargeStoreSummary:
    """What make_large_store wrote, for the bench to print and the smoke test to check against the store."""

    path: Path
    units: dict[str, int]  # per source
    layers: dict[str, int]  # per source
    examples: dict[str, int]  # per example kind
    dead_features: int
    contexts: int  # stored (referenced by some example)
    documents: int
    vocabulary: int  # tokens the logit effects name
    seconds: float

    @property
    def n_units(self) -> int:
        return sum(self.units.values())


def large_source_specs(units: int) -> list[SourceSpec]:
    """Split `units` the way a real harvest of SmolLM2-135M is shaped: SAE_SHARE of them a one-layer dictionary,
    the rest MLP neurons and residual dimensions in the 1,536 : 576 ratio over as many layers as fill them (widths
    shrink when fewer units than one full layer are asked for). At 100,000: 40 layers x (1,520 + 570) + 16,400."""
    if units < 3:
        raise ValueError(f"units={units}: need at least 3 (one per source)")
    rest = units - max(1, round(units * SAE_SHARE))
    n_layers = max(1, round(rest / (MLP_WIDTH + RESID_WIDTH)))
    mlp = max(1, rest * MLP_WIDTH // (MLP_WIDTH + RESID_WIDTH) // n_layers)
    resid = max(1, rest * RESID_WIDTH // (MLP_WIDTH + RESID_WIDTH) // n_layers)
    layers = tuple(range(n_layers))
    sae_layer = min(SAE_LAYER, n_layers - 1)
    return [SourceSpec("mlp", "mlp", False, layers, mlp, histogram_every=8),
            SourceSpec("resid", "resid", True, layers, resid, histogram_every=8),
            SourceSpec(f"sae:res{sae_layer}", "sae", False, (sae_layer,), units - n_layers * (mlp + resid))]


def large_vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    """`size` distinct display strings: special tokens, the hostile ones, then made-up words with and without a
    leading space (most common first)."""
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"] + ["th", "ing", "er", "an", "qu"]
    stems = [a + b for a in syllables for b in syllables]
    words = [" " + s for s in stems] + stems + [" " + s.capitalize() for s in stems] + [str(i) for i in range(100)]
    words = [w for w in dict.fromkeys(words) if w not in HOSTILE_TOKENS]
    head = ["<|endoftext|>", BOS] + HOSTILE_TOKENS
    if size > len(head) + len(words):
        raise ValueError(f"vocabulary of {size}: at most {len(head) + len(words)}")
    order = rng.permutation(len(words))[: max(size - len(head), 0)]
    return (head + [words[i] for i in order])[:size]


@dataclass(frozen=True)
class _Contexts:
    """The pool of contexts examples are drawn from (as many units share a harvest's contexts)."""

    token_ids: np.ndarray  # [n, context_length] int32, BOS first, padded past each length
    lengths: np.ndarray  # [n] tokens, BOS included
    vocabulary: pa.Array  # display strings by token id


def _contexts(n: int, context_length: int, vocabulary: list[str], rng: np.random.Generator) -> _Contexts:
    """Zipf-distributed tokens, hostile ones about as common as a frequent word; BOS first; the last context of
    each document shorter."""
    ranks = np.arange(len(vocabulary), dtype=np.float64)
    weights = 1 / (ranks + 3) ** 1.07
    weights[2:2 + len(HOSTILE_TOKENS)] = 1 / (50 + 3) ** 1.07
    weights[:2] = 0  # <|endoftext|> and BOS are never text
    token_ids = rng.choice(len(vocabulary), (n, context_length), p=weights / weights.sum()).astype(np.int32)
    token_ids[:, 0] = vocabulary.index(BOS)
    lengths = np.full(n, context_length, np.int64)
    last = (np.arange(n) % CONTEXTS_PER_DOCUMENT == CONTEXTS_PER_DOCUMENT - 1) | (np.arange(n) == n - 1)
    lengths[last] = rng.integers(8, context_length, int(last.sum()))
    return _Contexts(token_ids, lengths, pa.array(vocabulary, pa.string()))


def _distinct_picks(n_rows: int, per_row: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """[n_rows, per_row] indices into range(n), distinct within a row when n allows (a unit keeps each context
    once per kind), spread over the whole range."""
    step = max(n // per_row, 2)
    picks = rng.integers(0, n, (n_rows, 1)) + np.cumsum(rng.integers(1, step, (n_rows, per_row)), axis=1)
    return picks % n


def _ragged_list(rows: np.ndarray, lengths: np.ndarray, values: pa.Array | None = None) -> pa.ListArray:
    """Rows cut to their lengths as an Arrow list column; with `values`, the cells index into it (token strings)."""
    flat = rows[np.arange(rows.shape[1]) < lengths[:, None]]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat) if values is None else values.take(pa.array(flat)))


def _bin_middles() -> np.ndarray:
    """[261] the middle of each histogram bin (column 130 + b holds bin b), signed; the schema's edges."""
    b = np.arange(131, dtype=np.float64)
    lo = np.where(b <= 1, 0.0, 2.0 ** ((b - 2) // 4 - 16) * (1 + ((b - 2) % 4) / 4))
    hi = np.where(b <= 1, 2.0 ** -16, 2.0 ** ((b - 1) // 4 - 16) * (1 + ((b - 1) % 4) / 4))
    middle = np.where(b == 130, lo * 1.5, (lo + hi) / 2)
    middle[0] = 0.0
    return np.concatenate([-middle[:0:-1], middle])


def _side(counts: np.ndarray, rows: np.ndarray, top_bin: np.ndarray, n_bins: np.ndarray, mass: np.ndarray,
          sign: int) -> None:
    """Fill n_bins non-empty bins of one side of zero for `rows`, from top_bin (the unit's extreme lies in it)
    down: a bell over log |activation| peaking well below the extreme, at least 1 in every bin."""
    if len(rows) == 0:
        return
    depth = np.arange(int(n_bins.max()))[None, :]  # bins below the top one
    centre, spread = n_bins[:, None] * 0.6, np.maximum(n_bins[:, None] * 0.2, 1.0)
    inside = depth < n_bins[:, None]
    weights = np.exp(-0.5 * ((depth - centre) / spread) ** 2) * inside
    share = np.floor(mass[:, None] * weights / weights.sum(axis=1, keepdims=True))
    valid = inside & (top_bin[:, None] - depth >= 1)  # |bin| 1 is the lowest above zero
    column = 130 + sign * (top_bin[:, None] - depth)
    row = np.broadcast_to(rows[:, None], column.shape)
    counts[row[valid], column[valid]] = np.maximum(share[valid], 1).astype(np.int64)


_DEFAULTS = {f.name: f.default for f in fields(HarvestConfig)}


@dataclass(frozen=True)
class _Harvest:
    """The harvest settings the store pretends to come from (a harvest's defaults)."""

    context_length: int = _DEFAULTS["context_length"]
    top_k: int = _DEFAULTS["top_k"]
    intervals: int = _DEFAULTS["intervals"]
    per_interval: int = _DEFAULTS["per_interval"]
    n_random: int = _DEFAULTS["random_examples"]
    n_logits: int = _DEFAULTS["logits"]
    batch_size: int = _DEFAULTS["batch_size"]


@dataclass
class _Units:
    """One (source, layer)'s units: their extremes, firing share and scale, from which all else follows."""

    kind: str
    scale: np.ndarray  # typical |activation|
    max: np.ndarray  # the top example's value (0 for dead features)
    min: np.ndarray  # the bottom example's value (signed), the background's floor (mlp), 0 (sae)
    firing: np.ndarray  # share of tokens with activation > 0
    dead: np.ndarray  # bool
    bos: np.ndarray  # activation on BOS (an attention sink: large for neurons and residual dimensions)


def _draw_units(spec: SourceSpec, rng: np.random.Generator) -> _Units:
    """Each unit's scale and extremes, drawn as its kind's activations are distributed in a real model."""
    n = spec.n_units
    scale = rng.lognormal(0.0, 0.5, n)
    dead = np.zeros(n, bool)
    if spec.kind == "mlp":  # GELU-like: small negatives, a long positive tail
        top, bottom = scale * rng.uniform(2, 8, n), -0.17 * scale * rng.uniform(0.8, 1.0, n)
        firing, bos = rng.uniform(0.03, 0.5, n), scale * rng.uniform(3, 10, n)
    elif spec.kind == "resid":  # signed, with one massive-activation dimension as LLM residual streams have
        scale[7 % n] *= 60
        top, bottom = scale * rng.uniform(3, 8, n), -scale * rng.uniform(3, 8, n)
        firing, bos = rng.uniform(0.4, 0.6, n), scale * rng.uniform(10, 40, n) * rng.choice([-1, 1], n)
    else:  # an SAE feature: non-negative, firing on 0.01% to 5% of tokens; a few dead
        dead = rng.random(n) < DEAD_SHARE
        top, bottom = np.where(dead, 0.0, scale * rng.uniform(1.5, 6, n)), np.zeros(n)
        firing, bos = np.where(dead, 0.0, 10 ** rng.uniform(-4, -1.3, n)), np.zeros(n)
    return _Units(spec.kind, scale, top, bottom, firing, dead, bos)


def _statistics_and_histograms(u: _Units, n_tokens: int, every: int, rng: np.random.Generator
                               ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """add_units arguments and [units, 261] histogram counts that agree: each row sums to the tokens the
    histogram saw (n_tokens / every); n_firing, sum and sum of squares are read off it; the unit's extremes
    lie in its outermost bins."""
    n, seen = len(u.max), max(n_tokens // every, 1)
    counts = np.zeros((n, 261), np.int64)
    live = np.flatnonzero(~u.dead)
    positive, negative = {"mlp": ((14, 24), (10, 18)), "resid": ((10, 20), (10, 20)), "sae": ((22, 32), None)}[u.kind]
    _side(counts, live, np.abs(histogram_bin(u.max[live])), rng.integers(*positive, len(live)),
          seen * u.firing[live], 1)
    if negative is None:  # a feature is exactly zero wherever it does not fire
        counts[:, 130] = np.round(seen * (1 - u.firing)).astype(np.int64)
    else:
        _side(counts, np.arange(n), np.abs(histogram_bin(u.min)), rng.integers(*negative, n), seen * (1 - u.firing), -1)
    counts[np.arange(n), counts.argmax(axis=1)] += seen - counts.sum(axis=1)  # rounding, into the fullest bin
    middles, per_seen = _bin_middles(), n_tokens / seen
    stats = {"max_activation": u.max, "min_activation": u.min, "n_tokens": np.full(n, n_tokens),
             "n_firing": np.minimum(np.round(counts[:, 131:].sum(axis=1) * per_seen), n_tokens).astype(np.int64),
             "sum_activation": counts @ middles * per_seen, "sum_squares": counts @ middles ** 2 * per_seen}
    return stats, counts


def _backgrounds(context_length: int, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per kind of source: a pool of unit-scale background activations, read as [rows, context_length] windows
    at random offsets; and 16 peak shapes ([16, 2 * context_length - 1], 1 at the centre) of various widths."""
    x = rng.normal(-0.8, 1.0, POOL)
    pools = {"mlp": x / (1 + np.exp(-1.702 * x)),  # GELU
             "resid": rng.standard_normal(POOL),
             "sae": np.where(rng.random(POOL) < 0.02, rng.lognormal(-1.5, 0.6, POOL), 0.0)}
    distance = np.abs(np.arange(2 * context_length - 1) - (context_length - 1))[None, :]
    dense = np.exp(-distance / np.geomspace(0.5, 4.0, 16)[:, None])
    sparse = np.exp(-distance / np.geomspace(0.3, 1.2, 16)[:, None])
    kernels = {"mlp": dense, "resid": dense, "sae": np.where(sparse >= 0.15, sparse, 0.0)}
    return {kind: (pools[kind].astype(np.float32), kernels[kind].astype(np.float32)) for kind in pools}


def _large_activations(u: _Units, units: np.ndarray, values: np.ndarray, positions: np.ndarray, bottom: bool,
                       background: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """[rows, context_length] float32 per-token activations: the unit's background, kept strictly below the
    example's value (above it, for bottom examples) and within the unit's range, rising to a peak whose top,
    exactly the value, is at `positions`; BOS (position 0) as the unit's attention-sink value."""
    pool, kernels = background
    n, width = len(values), kernels.shape[1] // 2 + 1
    windows = np.lib.stride_tricks.sliding_window_view(pool, width)
    acts = windows[rng.integers(0, len(windows), n)] * u.scale[units, None].astype(np.float32)
    margin = 0.1 * np.abs(values) + 1e-6 * u.scale[units]
    if bottom:
        lower, upper = values + margin, 0.95 * u.max[units]
    else:
        lower, upper = 0.95 * u.min[units], values - margin
    np.clip(acts, lower[:, None].astype(np.float32), upper[:, None].astype(np.float32), out=acts)
    shapes = np.lib.stride_tricks.sliding_window_view(kernels, width, axis=1)
    peak = shapes[rng.integers(0, len(kernels), n), width - 1 - positions]
    v = values[:, None].astype(np.float32)
    if u.kind == "sae":  # zero but for the background's rare tokens and the few around the peak
        np.maximum(acts, v * peak, out=acts)
    else:
        acts += (v - acts) * peak
    acts[np.arange(n), positions] = values  # exactly, whatever the float arithmetic above did
    acts[:, 0] = u.bos[units]
    return acts


def _large_example_sets(u: _Units, chunk: np.ndarray, signed: bool, h: _Harvest, rng: np.random.Generator
                        ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
    """Per kind, for the units in `chunk`: values [m, slots], which slots hold an example [m, slots], ranks
    [m, slots], and for quantile examples the intervals [m, slots, 2]. Top: the max then shares of it falling
    to ~half; bottom likewise from the min; quantile: [0, W) in equal intervals, W the power of two above the
    max (only intervals below the max hold examples, 6 to 12 as in a real harvest); random: mostly low values."""
    m, top = len(chunk), u.max[chunk]
    floor = 0.3 if u.kind == "sae" else 0.55

    def ranked(extreme: np.ndarray) -> np.ndarray:
        shares = np.sort(rng.uniform(floor, 1.0, (m, h.top_k)), axis=1)[:, ::-1]
        shares[:, 0] = 1.0
        return extreme[:, None] * shares

    def plain(slots: int) -> tuple[np.ndarray, np.ndarray]:
        return np.ones((m, slots), bool), np.broadcast_to(np.arange(1, slots + 1), (m, slots))

    sets = {"top": (ranked(top), *plain(h.top_k), None)}
    if signed:
        sets["bottom"] = (ranked(u.min[chunk]), *plain(h.top_k), None)
    width = 2.0 ** (np.floor(np.log2(top)) + 1) / h.intervals
    lo = width[:, None] * np.arange(h.intervals)
    hi = lo + width[:, None]
    lowest, highest = np.maximum(lo, top[:, None] * 1e-3), np.minimum(hi, top[:, None])
    span = (highest - lowest)[..., None]  # negative above the max: those slots hold nothing
    values = lowest[..., None] + span * rng.random((m, h.intervals, h.per_interval))
    lo, hi = lo.astype(np.float32), hi.astype(np.float32)  # as stored: the value must stay inside in float32
    values = np.clip(values.astype(np.float32), lo[..., None], np.nextafter(hi, np.float32(0))[..., None])
    holds = np.broadcast_to((lo < top[:, None])[..., None], values.shape)
    ranks = np.broadcast_to(np.arange(1, h.per_interval + 1), values.shape)
    edges = np.broadcast_to(np.stack([lo, hi], axis=-1)[:, :, None, :], (*values.shape, 2))
    slots = h.intervals * h.per_interval
    sets["quantile"] = (values.reshape(m, slots), holds.reshape(m, slots), ranks.reshape(m, slots),
                        edges.reshape(m, slots, 2))
    sets["random"] = (top[:, None] * rng.uniform(0.05, 0.8, (m, h.n_random)) ** 1.5, *plain(h.n_random), None)
    return sets


def _write_large_layer(store: StoreWriter, spec: SourceSpec, layer: int, contexts: _Contexts, n_tokens: int,
                       h: _Harvest, backgrounds: dict[str, tuple[np.ndarray, np.ndarray]], used: np.ndarray,
                       named: np.ndarray, rng: np.random.Generator) -> tuple[dict[str, int], int]:
    """One (source, layer): its sources row, units, histograms, logit effects and examples; marks the contexts
    and tokens it refers to; returns the examples written per kind and the number of dead units."""
    hook = f"model.layers.{layer}.mlp.down_proj:input" if spec.kind == "mlp" else f"model.layers.{layer}:output"
    hook_name = f"blocks.{layer}.mlp.hook_post" if spec.kind == "mlp" else f"blocks.{layer}.hook_resid_post"
    dictionary = {}
    if spec.kind == "sae":
        dictionary = {"dictionary_path": f"/data/saes/smollm2-135m/<res>{layer}\u202e", "dictionary_format": "saelens",
                      "architecture": "topk", "config": {"architecture": "topk", "d_in": RESID_WIDTH,
                                                         "d_sae": spec.n_units, "k": 32, "hook_name": hook_name,
                                                         "note": "</script><script>alert(4)</script>"}}
    store.add_source(LARGE_MODEL, spec.name, layer, spec.n_units, hook, kind=spec.kind, hook_name=hook_name,
                     signed=spec.signed, histogram_every=spec.histogram_every, **dictionary)
    u = _draw_units(spec, rng)
    stats, counts = _statistics_and_histograms(u, n_tokens, spec.histogram_every, rng)
    n_pool = len(contexts.lengths)
    stats["n_examples"] = np.where(u.dead, 0, min(h.top_k, n_pool))
    store.add_units(LARGE_MODEL, spec.name, layer, **stats)
    store.add_histograms(LARGE_MODEL, spec.name, layer, counts)
    for polarity, sign in (("top", 1), ("bottom", -1)):
        ids = _distinct_picks(spec.n_units, h.n_logits, len(named), rng)
        effects = np.sort(rng.gamma(2.0, 0.4, ids.shape), axis=1)[:, ::-1] * rng.lognormal(0, 0.3, (len(ids), 1))
        store.add_logits(LARGE_MODEL, spec.name, layer, polarity, ids, sign * (effects + 0.05))
        named[ids] = True
    written: dict[str, int] = {}
    live = np.flatnonzero(~u.dead)
    for start in range(0, len(live), CHUNK):
        chunk = live[start:start + CHUNK]
        for kind, (values, holds, ranks, edges) in _large_example_sets(u, chunk, spec.signed, h, rng).items():
            picks = _distinct_picks(len(chunk), values.shape[1], n_pool, rng)[holds]
            units = np.broadcast_to(chunk[:, None], holds.shape)[holds]
            lengths = contexts.lengths[picks]
            positions = 1 + (rng.random(len(picks)) * (lengths - 1)).astype(np.int64)  # never BOS
            acts = _large_activations(u, units, values[holds], positions, kind == "bottom", backgrounds[spec.kind], rng)
            intervals = {} if edges is None else {"interval_lo": edges[holds][:, 0], "interval_hi": edges[holds][:, 1]}
            store.add_examples(LARGE_MODEL, spec.name, layer, kind, units=units, ranks=ranks[holds],
                               context_ids=picks, positions=positions, values=values[holds], activations=acts,
                               context_lengths=lengths, **intervals)
            used[picks] = True
            written[kind] = written.get(kind, 0) + len(picks)
    return written, int(u.dead.sum())


def make_large_store(path: Path, units: int = 100_000, seed: int = 0, *, n_contexts: int = 20_000,
                     vocabulary_size: int = 5_000, context_length: int = CONTEXT_LENGTH) -> LargeStoreSummary:
    """A store shaped like a real harvest's, of `units` units (split as large_source_specs says), for the site
    benchmark: per unit statistics, a histogram of ~30 non-empty bins, 10 top + 10 bottom logit effects and the
    CLI's default examples (20 top, 20 bottom for residual dimensions, 2 in each interval below the max, 4
    random), over contexts of `context_length` tokens shared between units, drawn from a pool of `n_contexts`
    over a vocabulary with hostile tokens (only referenced contexts are stored, as a harvest does).
    Deterministic for a seed."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    h = _Harvest(context_length=context_length)
    specs = large_source_specs(units)
    vocabulary = large_vocabulary(vocabulary_size, rng)
    contexts = _contexts(n_contexts, context_length, vocabulary, rng)
    n_tokens = int((contexts.lengths - 1).sum())
    backgrounds = _backgrounds(context_length, rng)
    used, named = np.zeros(n_contexts, bool), np.zeros(len(vocabulary), bool)
    examples, dead = dict.fromkeys(("top", "bottom", "quantile", "random"), 0), 0
    n_documents = -(-n_contexts // CONTEXTS_PER_DOCUMENT)
    with StoreWriter(path) as store:
        for spec in specs:
            for layer in spec.layers:
                written, n_dead = _write_large_layer(store, spec, layer, contexts, n_tokens, h, backgrounds, used,
                                                     named, rng)
                examples = {kind: n + written.get(kind, 0) for kind, n in examples.items()}
                dead += n_dead
        names = [f"corpus/shard-{d // 100:02d}/book-{d:05d}.txt" for d in range(n_documents)]
        names[: len(DOC_NAMES)] = DOC_NAMES[: len(names)]
        document_of = np.arange(n_contexts) // CONTEXTS_PER_DOCUMENT
        store.add_documents(np.arange(n_documents), names,
                            np.bincount(document_of, weights=contexts.lengths - 1, minlength=n_documents))
        kept = np.flatnonzero(used)
        rows, lengths = contexts.token_ids[kept], contexts.lengths[kept]
        store.add_contexts(kept, document_of[kept], (kept % CONTEXTS_PER_DOCUMENT) * (context_length - 1),
                           _ragged_list(rows, lengths), _ragged_list(rows, lengths, contexts.vocabulary))
        token_ids = np.flatnonzero(named)
        store.add_vocabulary(LARGE_MODEL, token_ids, [vocabulary[i] for i in token_ids])
        store.add_run(
            run_id=1, model=LARGE_MODEL, model_ref="HuggingFaceTB/SmolLM2-135M", model_type="llama",
            corpus="corpus/<b>synthetic</b>", n_documents=n_documents, n_contexts=n_contexts, n_tokens=n_tokens,
            context_length=context_length, top_k=h.top_k, layers=list(specs[0].layers), batch_size=h.batch_size,
            dtype="bfloat16", device="cpu", bos_token=BOS, bos_excluded=True, seed=seed,
            settings={"synthetic": "tests/synthetic_store.py make_large_store", "units": units, "seed": seed,
                      "n_contexts": n_contexts, "vocabulary_size": vocabulary_size},
            versions={"numpy": np.__version__, "pyarrow": pa.__version__}, started_at=datetime(2025, 1, 2, 3, 4),
            finished_at=datetime(2025, 1, 2, 4, 5), tokens_per_second=1449.0)
    return LargeStoreSummary(
        path=Path(path), units={s.name: s.n_units * len(s.layers) for s in specs},
        layers={s.name: len(s.layers) for s in specs}, examples=examples, dead_features=dead, contexts=len(kept),
        documents=n_documents, vocabulary=len(token_ids), seconds=time.perf_counter() - started)
