"""Synthetic stores for the site tests: small, deterministic, and full of hostile strings."""

from __future__ import annotations

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


def make_store(path: Path, n_layers: int = 2, n_units: int = 50, k: int = 5, context_length: int = 16,
               n_contexts: int = 120, vocabulary: list[str] | None = None, seed: int = 0,
               models: tuple[str, ...] = (MODEL,), source: str = "mlp") -> Path:
    """A store like a real harvest, scaled down: one run per model over shared contexts. Unit 3 has no
    examples, unit 4 only negative ones, unit 5 fewer than k; every context starts with BOS and nasty tokens
    are common."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary or (PLAIN_TOKENS * 3 + NASTY_TOKENS)
    tokens = [[BOS] + [vocab[i] for i in rng.integers(0, len(vocab), context_length - 1)]
              for _ in range(n_contexts)]
    with StoreWriter(path) as store:
        for run_id, model in enumerate(models, start=1):
            store.add_run(
                run_id=run_id, model=model, model_ref="tiny/lm", model_type="llama", corpus="corpus/<b>docs</b>",
                n_documents=len(DOC_NAMES), n_contexts=n_contexts, n_tokens=n_contexts * (context_length - 1),
                context_length=context_length, top_k=k, layers=list(range(n_layers)), batch_size=8,
                dtype="float32", device="cpu", bos_token=BOS, bos_excluded=True, settings={"seed": seed},
                versions={"torch": "x"}, started_at=datetime(2025, 1, 2, 3, 4),
                finished_at=datetime(2025, 1, 2, 4, 5), tokens_per_second=1e4)
        store.add_documents(np.arange(len(DOC_NAMES)), DOC_NAMES, np.full(len(DOC_NAMES), 1000))
        store.add_contexts(np.arange(n_contexts), np.arange(n_contexts) % len(DOC_NAMES),
                           np.arange(n_contexts) * 10, [[1] * context_length] * n_contexts, tokens)
        for model in models:
            for layer in range(n_layers):
                store.add_source(model, source, layer, n_units, f"model.layers.{layer}.mlp.down_proj:input")
                acts = (rng.standard_normal((n_units, k, context_length)) * 0.05).astype(np.float32)
                positions = rng.integers(1, context_length, (n_units, k))
                values = np.sort(rng.uniform(0.5, 5.0, (n_units, k)), axis=1)[:, ::-1].astype(np.float32)
                values[4] = -np.sort(rng.uniform(0.1, 1.0, k)).astype(np.float32)  # a unit that is never positive
                acts[4] = -np.abs(acts[4]) - 1.5
                context_ids = rng.integers(0, n_contexts, (n_units, k))
                context_ids[3] = -1
                context_ids[5, 2:] = -1
                units, ranks = np.indices((n_units, k))
                acts[units, ranks, positions] = values
                store.add_unit_examples(model, source, layer, values, context_ids, positions, acts,
                                        np.full((n_units, k), context_length))
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
