"""`featureatlas explain`: an explanation of each unit from its stored examples, scored by detection and fuzzing,
added to the store's `explanations` view.

Everything checkable (the store, the units, the numbers) is checked and every unit's examples are read before a
model is loaded or a request sent. Units are explained `concurrency` at a time (a local model runs one at a time);
the first failure stops the run and nothing is written, while the answers already received stay in the cache, so
the next run resumes where this one stopped. The rows go in through annotate's writer, in one transaction: per
unit, the explanation with its detection score and again with its fuzzing score (score_kind says which), author
the explainer's name; a re-run that writes the same rows adds nothing.
"""

from __future__ import annotations

import sys
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from featureatlas.annotate.explanations import MAX_NAME, AnnotateSummary, Record, add_records
from featureatlas.errors import UsageError, setting_name
from featureatlas.explain.client import ChatModel, Message, open_model
from featureatlas.explain.examples import ExampleReader, Unit, UnitExamples, select_units
from featureatlas.explain.prompts import explain_messages, parse_explanation
from featureatlas.explain.scoring import KINDS, Score, score, trials
from featureatlas.settings import device_setting, dtype_setting, setting
from featureatlas.store.schema import open_store
from featureatlas.text import terminal_text

EMBEDDED_MODEL = "smollm2-135m"  # load/models.py's name for it, spelled out: loading torch only to run an endpoint
# costs seconds (tests/test_explain.py checks the two agree)
FILE = "featureatlas explain"  # what the explanations view's `file` column records for these rows


@dataclass
class ExplainConfig:
    """What to explain, with what, and how; each field's help is the command line's."""

    store: Path = setting(help="the store whose units to explain (a .duckdb file written by harvest)")
    units: list[str] = setting(help="the units to explain, comma-separated or repeated: mlp/12/345, L12N345, "
                                    "sae:res15/123 ...", factory=list, metavar="ADDRESSES")
    source: str | None = setting(None, "explain the units of this source (mlp, resid, sae:NAME ...) that have "
                                       "examples, in order", metavar="SOURCE")
    layer: int | None = setting(None, "with --source: the layer (optional when the source has one)")
    limit: int | None = setting(None, "with --source: only the first N units", metavar="N")
    explainer: str = setting(EMBEDDED_MODEL, "the model that writes explanations: a local causal LM (folder, .gguf "
                                             "file, hub id, or smollm2-135m, the embedded default) or the base URL "
                                             "of an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1",
                             metavar="MODEL|URL")
    explainer_model: str | None = setting(None, "the endpoint's model name (default: the endpoint's only model)",
                                          metavar="NAME")
    scorer: str | None = setting(None, "the model that scores them, as --explainer (default: the explainer)",
                                 metavar="MODEL|URL")
    scorer_model: str | None = setting(None, "the scorer endpoint's model name (default: its only model)",
                                       metavar="NAME")
    score: bool = setting(True, "score each explanation by detection and fuzzing")
    api_key_env: str = setting("OPENAI_API_KEY", "the environment variable holding the endpoint's key, sent as "
                                                 "`Authorization: Bearer`; unset: no key", metavar="VAR")
    examples: int = setting(20, "top examples shown to the explainer", metavar="N")
    test_examples: int = setting(20, "held-out activating examples per score (and as many non-activating)",
                                 metavar="N")
    window: int = setting(32, "tokens of each example shown, around its max token", metavar="N")
    highlight: float | None = setting(None, "a token activates above this share of the unit's max (default: 0 for "
                                            "dictionary features, 0.2 for other units)", metavar="SHARE")
    batch: int = setting(5, "examples per scoring prompt", metavar="N")
    max_tokens: int = setting(300, "longest explainer answer, in tokens", metavar="N")
    concurrency: int = setting(4, "units explained at once (requests in flight to an endpoint)", metavar="N")
    retries: int = setting(4, "retries of a request that hit a rate limit, a server error or a timeout",
                           metavar="N")
    timeout: float = setting(120.0, "seconds to wait for an endpoint's answer", metavar="SECONDS")
    cache: bool = setting(True, "reuse and keep endpoint answers in the cache (docs/explain.md)")
    seed: int = setting(0, "seeds which examples are held out and the order they are asked in")
    device: str = device_setting("a local explainer's or scorer's device")
    dtype: str = dtype_setting()
    retry_delay: float = 1.0  # seconds before the first retry, doubling each time (library only: tests shorten it)


@dataclass
class UnitResult:
    """What one unit got."""

    unit: Unit
    text: str | None  # None: the explainer's answer held no explanation
    scores: list[Score] = field(default_factory=list)
    measured_negatives: int = 0
    negatives: int = 0


@dataclass
class ExplainSummary:
    """What a run did, for the one-line report."""

    store: Path
    explainer: str
    scorer: str | None
    units: int = 0
    explained: int = 0
    no_examples: int = 0
    unreadable: int = 0
    unread_predictions: int = 0
    results: list[UnitResult] = field(default_factory=list)
    written: AnnotateSummary | None = None
    requests: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name -> (sent, cached, retried)

    def line(self) -> str:
        by = f" with {terminal_text(self.explainer)}"
        if self.scorer is not None:
            by += "" if self.scorer == self.explainer else f", scored by {terminal_text(self.scorer)}"
        parts = [f"explained {self.explained:,} of {self.units:,} unit{'s' * (self.units != 1)}{by}"]
        if self.no_examples:
            parts.append(f"skipped {self.no_examples:,} without examples")
        if self.unreadable:
            parts.append(f"{self.unreadable:,} answer{'s' * (self.unreadable != 1)} held no explanation")
        if self.unread_predictions:
            parts.append(f"{self.unread_predictions:,} scorer verdicts unreadable (counted as no)")
        if self.written is not None:
            parts.append(f"added {self.written.added:,} rows to {self.store}"
                         + (f" ({self.written.duplicates:,} already there)" if self.written.duplicates else ""))
        for name, (sent, cached, retried) in self.requests.items():
            parts.append(f"{terminal_text(name)}: {sent:,} requests, {cached:,} answers from the cache"
                         + (f", {retried:,} retries" if retried else ""))
        return "; ".join(parts)


def explain_store(config: ExplainConfig, *, explainer: ChatModel | None = None, scorer: ChatModel | None = None,
                  out: TextIO | None = None) -> ExplainSummary:
    """Explain (and score) the units `config` names, print a line per unit to `out`, and add the results to the
    store. `explainer` / `scorer` replace the models the config names (the notebook API passes loaded ones)."""
    out = out or sys.stdout
    _check(config)
    con = open_store(config.store)
    try:
        units = select_units(con, addresses=_split(config.units), source=config.source, layer=config.layer,
                             limit=config.limit)
        reader = ExampleReader(con, shown=config.examples, tested=config.test_examples, window=config.window,
                               highlight=config.highlight, seed=config.seed)
        examples = [reader.read(unit) for unit in units]
    finally:
        con.close()
    if not units:
        raise UsageError(f"{config.store}: none of the units asked for has examples; nothing to explain")
    common = dict(api_key_env=config.api_key_env, timeout=config.timeout, retries=config.retries,
                  cache=config.cache, device=config.device, dtype=config.dtype, retry_delay=config.retry_delay)
    if explainer is None:
        explainer = open_model(config.explainer, config.explainer_model, option="explainer", **common)
    if config.score and scorer is None:
        scorer = explainer if config.scorer is None and config.scorer_model is None else open_model(
            config.scorer or config.explainer, config.scorer_model, option="scorer", **common)
    summary = ExplainSummary(store=config.store, explainer=explainer.name,
                             scorer=scorer.name if config.score and scorer is not None else None, units=len(units))
    lock, stop = threading.Lock(), threading.Event()
    explainer_used = _Stoppable(explainer, stop)
    scorer_used = _Stoppable(scorer, stop) if config.score and scorer is not None else None

    def one(item: UnitExamples) -> UnitResult | None:
        if not item.shown:
            return None
        try:
            result = _explain_unit(item, explainer_used, scorer_used, config)
        except BaseException:
            stop.set()  # the other units stop at their next request
            raise
        with lock:
            out.write(_unit_line(result) + "\n")
            out.flush()
        return result

    pool = ThreadPoolExecutor(max(1, config.concurrency), thread_name_prefix="featureatlas-explain")
    try:
        futures = [pool.submit(one, item) for item in examples]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            error = future.exception() if future.done() and not future.cancelled() else None
            if error is not None and not isinstance(error, _Stopped):
                raise error
        results = [f.result() for f in futures]
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    for result in results:
        if result is None:
            summary.no_examples += 1
        elif result.text is None:
            summary.unreadable += 1
        else:
            summary.explained += 1
            summary.results.append(result)
            summary.unread_predictions += sum(s.unread for s in result.scores)
    summary.written = add_records(config.store, _records(summary.results, explainer.name,
                                                         scorer.name if scorer is not None else None), FILE)
    for model in dict.fromkeys([explainer] + ([scorer] if config.score and scorer is not None else [])):
        counts = getattr(model, "counts", None)
        if counts is not None:
            summary.requests[model.name] = (counts.sent, counts.cached, counts.retried)
    return summary


class _Stopped(Exception):
    """Another unit failed: this one stops before its next request."""


class _Stoppable:
    """A model that refuses new requests once `stop` is set."""

    def __init__(self, model: ChatModel, stop: threading.Event) -> None:
        self.model, self.stop, self.name = model, stop, model.name

    def complete(self, messages: Sequence[Message], max_tokens: int) -> str:
        if self.stop.is_set():
            raise _Stopped
        return self.model.complete(messages, max_tokens)


def _check(config: ExplainConfig) -> None:
    for name in ("examples", "batch", "max_tokens", "concurrency"):
        if getattr(config, name) < 1:
            raise UsageError(f"{setting_name(name)} {getattr(config, name)}: give at least 1")
    if config.score and config.test_examples < 1:
        raise UsageError(f"{setting_name('test_examples')} {config.test_examples}: give at least 1, or turn "
                         f"{setting_name('score')} off")
    if not config.score and (config.scorer is not None or config.scorer_model is not None):
        raise UsageError(f"{setting_name('scorer')} names a scorer but {setting_name('score')} is off; leave one "
                         "of them out")
    if config.source is None and (config.layer is not None or config.limit is not None):
        raise UsageError(f"{setting_name('layer')} and {setting_name('limit')} go with {setting_name('source')}")


def _split(units: list[str]) -> list[str]:
    return [part.strip() for value in units for part in value.split(",") if part.strip()]


def _explain_unit(item: UnitExamples, explainer: ChatModel, scorer: ChatModel | None,
                  config: ExplainConfig) -> UnitResult:
    answer = explainer.complete(explain_messages(item.shown, item.threshold), config.max_tokens)
    result = UnitResult(item.unit, parse_explanation(answer), measured_negatives=item.measured_negatives,
                        negatives=len(item.non_activating))
    if result.text is None or scorer is None or not item.activating:
        return result
    unit = item.unit
    for number, kind in enumerate(KINDS):
        rng = np.random.default_rng([config.seed, unit.layer, unit.unit, number,
                                     zlib.crc32(f"{unit.model}\0{unit.source}".encode())])
        result.scores.append(score(scorer, kind, result.text, trials(kind, item, rng), config.batch))
    return result


def _records(results: list[UnitResult], author: str, scorer: str | None) -> list[Record]:
    author = author[:MAX_NAME]
    records = []
    for r in results:
        u = r.unit
        base = dict(where=f"{FILE}: {u.address}", text=r.text, author=author, model=u.model, source=u.source,
                    layer=u.layer, unit=u.unit)
        scored = [s for s in r.scores if s.balanced_accuracy is not None]
        for s in scored:
            kind = f"{s.kind} balanced accuracy" + (f", scored by {scorer}" if scorer not in (None, author) else "")
            records.append(Record(**base, score=s.balanced_accuracy, score_kind=kind[:MAX_NAME]))
        if not scored:
            records.append(Record(**base))
    return records


def _unit_line(result: UnitResult) -> str:
    scores = "  ".join(f"{s.kind} {s.balanced_accuracy:.2f}" if s.balanced_accuracy is not None else
                       f"{s.kind} -" for s in result.scores)
    text = terminal_text(result.text) if result.text is not None else "(no explanation in the answer)"
    return f"{terminal_text(result.unit.address)}  {scores + '  ' if scores else ''}{text}"
