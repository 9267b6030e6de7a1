"""The harvest: model → hooks → exact top-k accumulators → store, in one pass over the corpus."""

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
from featureatlas.harvest.contexts import Batch, Context, DocumentInfo, display_tokens, iter_batches, iter_contexts
from featureatlas.harvest.corpus import CorpusError, corpus_files, iter_documents
from featureatlas.harvest.models import load_model, pick_device, pick_dtype, resolve_model
from featureatlas.harvest.sources import UnitSource, mlp_sources, parse_layers
from featureatlas.harvest.topk import TopK
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


class _StopForward(Exception):
    """Raised after the last harvested layer: later layers and the LM head are never computed."""


def validate(config: HarvestConfig) -> None:
    for name, minimum in (("context_length", 2), ("top_k", 1), ("batch_size", 1)):
        if getattr(config, name) < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum}")
    if config.tokens is not None and config.tokens < 1:
        raise UsageError("--tokens must be at least 1")
    corpus_files(Path(config.corpus))
    check_writable_target(Path(config.out))


def harvest(config: HarvestConfig) -> HarvestSummary:
    validate(config)
    started = datetime.now(timezone.utc).replace(tzinfo=None)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    ref = resolve_model(config.model)
    model, tokenizer = load_model(ref, device, dtype)
    backbone = model.base_model
    model_type = model.config.model_type
    blocks = blocks_of(backbone, model_type)
    sources = mlp_sources(backbone, model_type, parse_layers(config.layers, len(blocks)))
    accumulators = [TopK(s.n_units, config.top_k, config.context_length, device, dtype) for s in sources]
    has_bos = tokenizer.bos_token_id is not None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    with StoreWriter(config.out) as store:
        documents: list[DocumentInfo] = []

        def flush_documents() -> None:
            if documents:
                store.add_documents(np.array([d.document_id for d in documents]), [d.name for d in documents],
                                    np.array([d.n_tokens for d in documents]))
                documents.clear()

        contexts = iter_contexts(iter_documents(Path(config.corpus), config.text_field), tokenizer,
                                 config.context_length, config.tokens, documents.append)
        kept: dict[int, Context] = {}
        n_tokens = n_contexts = 0
        t0 = time.perf_counter()
        bar = tqdm.tqdm(total=config.tokens, unit="tok", unit_scale=True, desc="harvest",
                        disable=not config.progress, dynamic_ncols=True)
        with _hooks(sources, accumulators, blocks[max(s.layer for s in sources)]) as current:
            for step, (batch, batch_contexts) in enumerate(iter_batches(contexts, config.batch_size, has_bos, pad_id)):
                current["counted"] = batch.counted.to(device, non_blocking=True)
                current["context_ids"] = batch.context_ids.to(device, non_blocking=True)
                with torch.inference_mode():
                    try:
                        backbone(input_ids=batch.input_ids.to(device, non_blocking=True), use_cache=False,
                                 attention_mask=_padding_mask(batch, device))
                    except _StopForward:
                        pass
                kept.update((c.context_id, c) for c in batch_contexts)
                if step % _PRUNE_EVERY == _PRUNE_EVERY - 1:
                    kept = _still_referenced(kept, accumulators)
                    flush_documents()
                n_tokens += batch.n_text_tokens
                n_contexts += len(batch_contexts)
                bar.update(batch.n_text_tokens)
        bar.close()
        seconds = time.perf_counter() - t0
        flush_documents()
        if n_contexts == 0:
            raise CorpusError(f"{config.corpus}: holds no text (every document is empty); point --corpus at text")

        kept = _still_referenced(kept, accumulators)
        ordered = sorted(kept.values(), key=lambda c: c.context_id)
        lengths = {c.context_id: len(c.token_ids) for c in ordered}
        store.add_contexts(np.array([c.context_id for c in ordered]), np.array([c.document_id for c in ordered]),
                           np.array([c.start_token for c in ordered]), [c.token_ids for c in ordered],
                           display_tokens(tokenizer, [c.token_ids for c in ordered]))
        for source, acc in zip(sources, accumulators):
            store.add_source(ref.display_name, source.name, source.layer, source.n_units, source.hook)
            ids = acc.context_ids.cpu().numpy()
            context_lengths = np.vectorize(lambda i: lengths.get(int(i), 0), otypes=[np.int64])(ids)
            store.add_unit_examples(ref.display_name, source.name, source.layer, acc.values.cpu().numpy(), ids,
                                    acc.positions.cpu().numpy(), acc.activations.float().cpu().numpy(),
                                    context_lengths)
        store.add_run(
            run_id=1, model=ref.display_name, model_ref=config.model, model_type=model_type,
            corpus=str(config.corpus), n_documents=_count_documents(store.con), n_contexts=n_contexts,
            n_tokens=n_tokens, context_length=config.context_length, top_k=config.top_k,
            layers=[s.layer for s in sources], batch_size=config.batch_size, dtype=str(dtype).removeprefix("torch."),
            device=str(device), bos_token=tokenizer.bos_token if has_bos else None, bos_excluded=has_bos,
            settings={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
            versions=_versions(), started_at=started,
            finished_at=datetime.now(timezone.utc).replace(tzinfo=None),
            tokens_per_second=n_tokens / seconds if seconds else 0.0)
    return HarvestSummary(Path(config.out), sum(s.n_units for s in sources), n_tokens, n_contexts, seconds,
                          n_tokens / seconds if seconds else 0.0)


class _hooks:
    """Registers one pre-forward hook per source, feeding its accumulator, and a stop after the last layer."""

    def __init__(self, sources: list[UnitSource], accumulators: list[TopK], last_block: torch.nn.Module):
        self.current: dict[str, torch.Tensor] = {}
        self.handles = []
        for source, acc in zip(sources, accumulators):
            def read(module, args, source=source, acc=acc):
                counted = self.current["counted"]
                acc.update(source.activations(args[0], *counted.shape), counted, self.current["context_ids"])
            self.handles.append(source.module.register_forward_pre_hook(read))

        def stop(module, args, output):
            raise _StopForward
        self.handles.append(last_block.register_forward_hook(stop))

    def __enter__(self) -> dict[str, torch.Tensor]:
        return self.current

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def _padding_mask(batch: Batch, device: torch.device) -> torch.Tensor | None:
    """Only batches with padding get a mask (it is at the end, so causal attention never sees it anyway)."""
    if bool((batch.lengths == batch.input_ids.shape[1]).all()):
        return None
    return (torch.arange(batch.input_ids.shape[1])[None, :] < batch.lengths[:, None]).to(device)


def _still_referenced(kept: dict[int, Context], accumulators: list[TopK]) -> dict[int, Context]:
    referenced = set(torch.cat([acc.referenced_context_ids() for acc in accumulators]).tolist())
    return {cid: c for cid, c in kept.items() if cid in referenced}


def _count_documents(con: duckdb.DuckDBPyConnection) -> int:
    return con.execute("SELECT count(*) FROM t_documents").fetchone()[0]


def _versions() -> dict[str, str]:
    import featureatlas  # noqa: F401
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"
    return {"featureatlas": v("featureatlas"), "torch": torch.__version__, "transformers": transformers.__version__,
            "duckdb": duckdb.__version__, "python": platform.python_version()}
