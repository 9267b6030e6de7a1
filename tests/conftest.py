"""Synthetic stores for the site tests: small, deterministic, realistic in shape, and full of hostile strings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

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


@pytest.fixture(scope="session")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "store.duckdb")


@pytest.fixture(scope="session")
def site_dir(tmp_path_factory: pytest.TempPathFactory, store_path: Path) -> Path:
    from featureatlas.build.site import build_site

    out = tmp_path_factory.mktemp("site") / "site"
    build_site(store_path, out, workers=1, progress=False)
    return out
