"""The harvest command: corpus → contexts → batches → Harvester → store, in one pass over the corpus."""

from __future__ import annotations

import itertools
import platform
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import torch
import tqdm
import transformers

from featureatlas.errors import UsageError, setting_name
from featureatlas.harvest.accumulators import Settings, choose_backend
from featureatlas.harvest.attention import write_attributions
from featureatlas.harvest.checkpoint import Checkpointer, run_inputs, shaping_options
from featureatlas.harvest.config import HarvestConfig, validate
from featureatlas.harvest.contexts import Context, DocumentInfo, display_tokens, iter_batches, iter_contexts
from featureatlas.harvest.harvester import Harvester, check_widths
from featureatlas.harvest.heads import head_sources
from featureatlas.harvest.logits import LogitEffects
from featureatlas.harvest.prefetch import prefetched
from featureatlas.harvest.relations import cooccurrence_record, write_neighbours_across, write_relations
from featureatlas.harvest.sources import UnitSource, dictionary_sources, mlp_sources, parse_layers, resid_sources
from featureatlas.harvest.write import ContextLengths, write_logits, write_source, write_vocabulary
from featureatlas.load.architectures import blocks_of
from featureatlas.load.corpus import CorpusError, iter_documents
from featureatlas.load.models import ModelRef, check_length, load_model, pick_device, pick_dtype, resolve_model
from featureatlas.store.writer import StoreWriter

if TYPE_CHECKING:  # for type hints only: importing them takes seconds
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from featureatlas.load.dictionaries import Dictionary

_PRUNE_EVERY = 64  # batches between drops of contexts that no unit keeps any more


@dataclass
class HarvestSummary:
    store: Path
    n_units: int
    n_tokens: int
    n_contexts: int
    seconds: float
    tokens_per_second: float


def build_sources(model: torch.nn.Module, config: HarvestConfig, device: torch.device) -> list[UnitSource]:
    """Neurons, residual dimensions and dictionary features, in that order; every hook checked against the model."""
    backbone, model_type = model.base_model, model.config.model_type
    n_layers = len(blocks_of(backbone, model_type))
    sources = mlp_sources(backbone, model_type, parse_layers(config.layers, n_layers))
    if config.resid is not None:
        sources += resid_sources(backbone, model_type, parse_layers(config.resid, n_layers, "resid"),
                                 model.config.hidden_size)
    if config.heads is not None:
        sources += head_sources(model, parse_layers(config.heads, n_layers, "heads"))
    named: list[tuple[str, Dictionary]] = []
    if config.saes:
        from featureatlas.load.dictionaries import load_dictionaries  # only a harvest with --sae needs it
    for spec in config.saes:
        name, _, path = spec.rpartition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        if not path.strip():
            raise UsageError(f"{setting_name('saes')} {spec!r}: no folder given; pass {setting_name('saes')} "
                             f"PATH or {setting_name('saes')} NAME=PATH")
        found = load_dictionaries(path)
        for dictionary in found:
            label = name or dictionary.path.name
            if name and len(found) > 1:
                label = f"{name}/{dictionary.path.name}"
            if any(label == taken for taken, _ in named):
                label = f"{dictionary.path.parent.name}/{dictionary.path.name}"
            named.append((label, dictionary))
    sources += dictionary_sources(named, backbone, model_type, device)
    if not sources:
        raise UsageError(f"nothing to harvest: {setting_name('layers')} none and no {setting_name('resid')} or "
                         f"{setting_name('saes')}; ask for some units")
    check_widths(model, sources)
    return sources


def harvest(config: HarvestConfig, loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelRef] | None = None
            ) -> HarvestSummary:
    """loaded: the model, tokenizer and ref already in memory (the demo trains its SAE on the same model first)."""
    validate(config)
    started = _now()
    if loaded is None:
        device = pick_device(config.device)
        ref = resolve_model(config.model)
        model, tokenizer = load_model(ref, device, pick_dtype(config.dtype, device))
    else:
        model, tokenizer, ref = loaded
        device = next(model.parameters()).device
    check_length(model, config.context_length, "context_length", "choose a shorter context length")
    sources = build_sources(model, config, device)
    has_bos = tokenizer.bos_token_id is not None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    settings = Settings(top_k=config.top_k, bottom_k=config.top_k if config.bottom_k is None else config.bottom_k,
                        intervals=config.intervals, per_interval=config.per_interval, random=config.random_examples,
                        histogram_every=config.histogram_every, seed=config.seed,
                        compile=_compile(config.compile, device, config.tokens),
                        cooccurrence=config.cooccurrence and config.shard is None,  # a merge drops shards' lists
                        backend=choose_backend(device, config.fixed_shapes, config.cuda_graphs, config.native))

    inputs = _inputs(config, ref, model, sources) if config.resume or config.checkpoint_every is not None else {}
    checkpoints = Checkpointer(Path(config.out), config.checkpoint_every, inputs)
    with StoreWriter(config.out) as store, \
            Harvester(model, sources, settings, config.context_length, int(has_bos)) as harvester:
        documents: deque[DocumentInfo] = deque()  # appended to by the thread making batches (prefetch.py)
        contexts = iter_contexts(iter_documents(config.corpus, config.text_field, config.token_field, config.split),
                                 tokenizer, config.context_length, config.tokens, documents.append)
        if config.shard is not None:  # every shard reads the whole corpus: context ids stay global
            contexts = (c for c in contexts if c.context_id % config.shard[1] == config.shard[0])
        kept: dict[int, Context] = {}  # contexts some unit still keeps: their tokens are written at the end
        n_tokens = n_contexts = 0
        elapsed = 0.0  # forward-pass seconds of earlier runs, when resuming
        if config.resume:
            resumed = checkpoints.load(config, harvester.accumulators)
            n_tokens, n_contexts, elapsed, started = (resumed[k] for k in ("n_tokens", "n_contexts", "elapsed",
                                                                           "started_at"))
            kept = _only({c.context_id: c for c in itertools.islice(contexts, n_contexts)},
                         harvester.referenced_context_ids())  # read again, not run again
        t0 = time.perf_counter()
        batches = iter_batches(contexts, config.batch_size, has_bos, pad_id)
        if device.type == "cuda":  # pinned on the helper thread, so that the copies to the GPU do not wait
            batches = ((batch.pinned(), batch_contexts) for batch, batch_contexts in batches)
        with tqdm.tqdm(total=config.tokens, initial=n_tokens, unit="tok", unit_scale=True, desc="harvest",
                       disable=not config.progress, dynamic_ncols=True) as bar:
            for step, (batch, batch_contexts) in enumerate(prefetched(batches)):
                harvester.step(batch)
                kept.update((c.context_id, c) for c in batch_contexts)
                if step % _PRUNE_EVERY == _PRUNE_EVERY - 1:
                    kept = _only(kept, harvester.referenced_context_ids())
                    _write_documents(store, documents)
                n_tokens += batch.n_text_tokens
                n_contexts += len(batch_contexts)
                bar.update(batch.n_text_tokens)
                if checkpoints.due(n_tokens):
                    checkpoints.save(config, harvester.accumulators, n_contexts, n_tokens,
                                     elapsed + time.perf_counter() - t0, started)
        seconds = elapsed + time.perf_counter() - t0
        if n_contexts == 0:
            raise CorpusError(f"{config.corpus}: holds no text (every document is empty); point "
                              f"{setting_name('corpus')} at text")
        _write_documents(store, documents)
        kept = _only(kept, harvester.referenced_context_ids())
        _write_contexts(store, tokenizer, kept)
        lengths = ContextLengths(kept)
        token_ids: set[int] = set()
        with tqdm.tqdm(total=sum(s.n_units for s in sources), unit="unit", unit_scale=True, desc="store",
                       disable=not config.progress, dynamic_ncols=True) as bar, \
                ThreadPoolExecutor(1) as pool:  # the logits' matmuls run while the examples are inserted
            effects: dict[object, Future] = {}
            logit_effects = LogitEffects(model, config.logits)
            for source in sources:
                if _effect_key(source) not in effects:
                    effects[_effect_key(source)] = pool.submit(logit_effects, source)
            for source, acc in zip(harvester.sources, harvester.accumulators, strict=True):
                write_source(store, ref.display_name, source, acc, lengths)
                token_ids |= write_logits(store, ref.display_name, source, effects[_effect_key(source)].result())
                write_relations(store, ref.display_name, model, source, config.seed, acc.cooccurrence)
                bar.update(source.n_units)
        if config.neighbours_across:
            write_neighbours_across(store, ref.display_name, sources)
        write_vocabulary(store, ref.display_name, tokenizer, token_ids)
        harvester.detach()  # the post-passes below run forward passes of their own
        # Where heads looked, for heads and hook_z dictionaries only (harvest/attention.py); nothing for the rest
        write_attributions(store, ref.display_name, model, sources, config.batch_size, config.progress)
        if config.ablation_effects:  # a post-pass over the top examples just written (harvest/ablation.py)
            from featureatlas.harvest.ablation import write_ablations
            write_ablations(store, ref.display_name, model, sources,
                            {cid: c.token_ids for cid, c in kept.items()}, config.batch_size, config.progress)
        mlp_layers = sorted({s.layer for s in sources if s.kind == "mlp"})
        store.add_run(
            run_id=1, model=ref.display_name, model_ref=config.model, model_type=model.config.model_type,
            corpus=str(config.corpus), n_documents=_count(store.con, "t_documents"), n_contexts=n_contexts,
            n_tokens=n_tokens, context_length=config.context_length, top_k=config.top_k, layers=mlp_layers,
            batch_size=config.batch_size, dtype=str(model.dtype).removeprefix("torch."), device=str(device),
            bos_token=tokenizer.bos_token if has_bos else None, bos_excluded=has_bos, seed=config.seed,
            settings={**shaping_options(config),
                      **cooccurrence_record(sources, [acc.cooccurrence for acc in harvester.accumulators])},
            versions=_versions(), started_at=started, finished_at=_now(),
            tokens_per_second=n_tokens / seconds)
        n_units = sum(s.n_units for s in harvester.sources)
    checkpoints.remove()  # the store is in place: nothing is left to resume
    return HarvestSummary(Path(config.out), n_units, n_tokens, n_contexts, seconds, n_tokens / seconds)


def _inputs(config: HarvestConfig, ref: ModelRef, model: PreTrainedModel, sources: list[UnitSource]
            ) -> dict[str, dict]:
    """Fingerprints of the corpus, model and dictionary files, which a resume must find unchanged."""
    local = ref.gguf_file is not None or Path(ref.location).is_dir()
    revision = None if local else getattr(model.config, "_commit_hash", None)
    return run_inputs(config.corpus, config.split, ref.location, ref.gguf_file, revision,
                      [s.dictionary.path for s in sources if s.dictionary is not None])


def _compile(choice: str, device: torch.device, tokens: int | None) -> bool:
    """auto: where the one-off compile (seconds to a minute; on CUDA about a minute for the fixed-shape steps too)
    pays for itself."""
    if choice == "auto":
        return tokens is None or tokens >= 1_000_000
    return choice == "on"


def _effect_key(source: UnitSource) -> object:
    """Sources with the same logit effects: every layer's residual dimension i is basis vector i."""
    return "resid" if source.kind == "resid" else id(source)


def _only(kept: dict[int, Context], referenced: set[int]) -> dict[int, Context]:
    return {cid: c for cid, c in kept.items() if cid in referenced}


def _write_documents(store: StoreWriter, documents: deque[DocumentInfo]) -> None:
    """Writes the documents listed so far (taken one by one: the batch-making thread may be adding more)."""
    taken = [documents.popleft() for _ in range(len(documents))]
    if taken:
        store.add_documents(np.array([d.document_id for d in taken]), [d.name for d in taken],
                            np.array([d.n_tokens for d in taken]))


def _write_contexts(store: StoreWriter, tokenizer: transformers.PreTrainedTokenizerBase,
                    kept: dict[int, Context]) -> None:
    ordered = sorted(kept.values(), key=lambda c: c.context_id)
    store.add_contexts(np.array([c.context_id for c in ordered]), np.array([c.document_id for c in ordered]),
                       np.array([c.start_token for c in ordered]), [c.token_ids for c in ordered],
                       display_tokens(tokenizer, [c.token_ids for c in ordered]))


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        featureatlas_version = version("featureatlas")
    except PackageNotFoundError:
        featureatlas_version = "unknown"
    return {"featureatlas": featureatlas_version, "torch": torch.__version__,
            "transformers": transformers.__version__, "duckdb": duckdb.__version__,
            "python": platform.python_version()}
