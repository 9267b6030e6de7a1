"""The harvest command: corpus → contexts → batches → Harvester → store, in one pass over the corpus."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import torch
import tqdm
import transformers

from featureatlas.errors import UsageError
from featureatlas.harvest.architectures import blocks_of
from featureatlas.harvest.contexts import Context, DocumentInfo, display_tokens, iter_batches, iter_contexts
from featureatlas.harvest.corpus import CorpusError, corpus_files, iter_documents
from featureatlas.harvest.harvester import Harvester
from featureatlas.harvest.models import load_model, pick_device, pick_dtype, resolve_model
from featureatlas.harvest.sources import parse_layers
from featureatlas.store.writer import StoreWriter, check_writable_target

_PRUNE_EVERY = 64  # batches between drops of contexts that no unit keeps any more


@dataclass
class HarvestConfig:
    model: str
    corpus: Path
    out: Path
    tokens: int | None = None
    context_length: int = 64
    top_k: int = 20
    layers: str | None = None
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    text_field: str = "text"
    progress: bool = True


@dataclass
class HarvestSummary:
    store: Path
    n_units: int
    n_tokens: int
    n_contexts: int
    seconds: float
    tokens_per_second: float


def validate(config: HarvestConfig) -> None:
    """Everything that can be checked before loading a model, so mistakes cost seconds, not minutes."""
    for name, minimum in (("context_length", 2), ("top_k", 1), ("batch_size", 1)):
        if getattr(config, name) < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum}")
    if config.tokens is not None and config.tokens < 1:
        raise UsageError("--tokens must be at least 1")
    corpus_files(Path(config.corpus))
    check_writable_target(Path(config.out))


def harvest(config: HarvestConfig) -> HarvestSummary:
    validate(config)
    started = _now()
    device = pick_device(config.device)
    ref = resolve_model(config.model)
    model, tokenizer = load_model(ref, device, pick_dtype(config.dtype, device))
    layers = parse_layers(config.layers, len(blocks_of(model.base_model, model.config.model_type)))
    has_bos = tokenizer.bos_token_id is not None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    with StoreWriter(config.out) as store, \
            Harvester(model, layers, config.top_k, config.context_length, int(has_bos)) as harvester:
        documents: list[DocumentInfo] = []
        contexts = iter_contexts(iter_documents(Path(config.corpus), config.text_field), tokenizer,
                                 config.context_length, config.tokens, documents.append)
        kept: dict[int, Context] = {}  # contexts some unit still keeps: their tokens are written at the end
        n_tokens = n_contexts = 0
        t0 = time.perf_counter()
        with tqdm.tqdm(total=config.tokens, unit="tok", unit_scale=True, desc="harvest",
                       disable=not config.progress, dynamic_ncols=True) as bar:
            for step, (batch, batch_contexts) in enumerate(
                    iter_batches(contexts, config.batch_size, has_bos, pad_id)):
                harvester.step(batch)
                kept.update((c.context_id, c) for c in batch_contexts)
                if step % _PRUNE_EVERY == _PRUNE_EVERY - 1:
                    kept = _only(kept, harvester.referenced_context_ids())
                    _write_documents(store, documents)
                n_tokens += batch.n_text_tokens
                n_contexts += len(batch_contexts)
                bar.update(batch.n_text_tokens)
        seconds = time.perf_counter() - t0
        if n_contexts == 0:
            raise CorpusError(f"{config.corpus}: holds no text (every document is empty); point --corpus at text")
        _write_documents(store, documents)
        kept = _only(kept, harvester.referenced_context_ids())
        _write_contexts(store, tokenizer, kept)
        lengths = {cid: len(c.token_ids) for cid, c in kept.items()}
        for source, acc in zip(harvester.sources, harvester.accumulators, strict=True):
            store.add_source(ref.display_name, source.name, source.layer, source.n_units, source.hook)
            ids = acc.context_ids.cpu().numpy()
            context_lengths = np.array([lengths.get(i, 0) for i in ids.ravel().tolist()]).reshape(ids.shape)
            store.add_unit_examples(ref.display_name, source.name, source.layer, acc.values.cpu().numpy(), ids,
                                    acc.positions.cpu().numpy(), acc.activations().float().cpu().numpy(),
                                    context_lengths)
        store.add_run(
            run_id=1, model=ref.display_name, model_ref=config.model, model_type=model.config.model_type,
            corpus=str(config.corpus), n_documents=_count(store.con, "t_documents"), n_contexts=n_contexts,
            n_tokens=n_tokens, context_length=config.context_length, top_k=config.top_k, layers=layers,
            batch_size=config.batch_size, dtype=str(model.dtype).removeprefix("torch."), device=str(device),
            bos_token=tokenizer.bos_token if has_bos else None, bos_excluded=has_bos,
            settings={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
            versions=_versions(), started_at=started, finished_at=_now(),
            tokens_per_second=n_tokens / seconds)
        n_units = sum(s.n_units for s in harvester.sources)
    return HarvestSummary(Path(config.out), n_units, n_tokens, n_contexts, seconds, n_tokens / seconds)


def _only(kept: dict[int, Context], referenced: set[int]) -> dict[int, Context]:
    return {cid: c for cid, c in kept.items() if cid in referenced}


def _write_documents(store: StoreWriter, documents: list[DocumentInfo]) -> None:
    if documents:
        store.add_documents(np.array([d.document_id for d in documents]), [d.name for d in documents],
                            np.array([d.n_tokens for d in documents]))
        documents.clear()


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
