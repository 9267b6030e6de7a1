"""`featureatlas train-sae`: collect a hook's activations over a corpus, train a top-k SAE, save it for SAELens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from featureatlas.errors import UsageError
from featureatlas.harvest.architectures import blocks_of
from featureatlas.harvest.contexts import iter_batches, iter_contexts
from featureatlas.harvest.corpus import iter_documents
from featureatlas.harvest.hooks import Hook, read_hook, resolve_hook
from featureatlas.harvest.models import ModelRef
from featureatlas.harvest.train_sae import TrainConfig, TrainResult, save_saelens_folder, train_topk_sae


@dataclass
class TrainSaeConfig:
    hook: str
    corpus: Path
    out: Path
    features: int = 4096
    k: int = 32
    tokens: int = 100_000
    context_length: int = 64
    batch_size: int = 32
    steps: int | None = None
    seed: int = 0
    text_field: str = "text"
    overwrite: bool = False
    progress: bool = True


class _Stop(Exception):
    pass


def collect_activations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, hook: Hook, corpus: Path,
                        tokens: int, context_length: int, batch_size: int, text_field: str = "text",
                        progress: bool = True) -> torch.Tensor:
    """[n, width] float32 on the CPU: the hook's vector at every counted token (BOS and padding never count),
    from the same contexts a harvest makes; the forward pass stops at the hook's block."""
    backbone = model.base_model
    device = next(model.parameters()).device
    has_bos = tokenizer.bos_token_id is not None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[torch.Tensor] = []
    counted: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> None:
        mask = counted[0]
        rows.append(tensor.reshape(*mask.shape, -1)[mask].float().cpu())

    handle = read_hook(backbone, hook, keep)
    stop = blocks_of(backbone, model.config.model_type)[hook.layer].register_forward_hook(_raise_stop)
    contexts = iter_contexts(iter_documents(corpus, text_field), tokenizer, context_length, tokens, lambda d: None)
    try:
        with tqdm.tqdm(total=tokens, unit="tok", unit_scale=True, desc="collect", disable=not progress,
                       dynamic_ncols=True) as bar, torch.inference_mode():
            for batch, _ in iter_batches(contexts, batch_size, has_bos, pad_id):
                counted[:] = [batch.counted.to(device)]
                mask = (batch.counted | (torch.arange(batch.input_ids.shape[1]) == 0)) if batch.padded else None
                try:
                    backbone(input_ids=batch.input_ids.to(device), use_cache=False,
                             attention_mask=None if mask is None else mask.to(device))
                except _Stop:
                    pass
                bar.update(batch.n_text_tokens)
    finally:
        handle.remove()
        stop.remove()
    if not rows:
        raise UsageError(f"{corpus}: holds no text to train on; point --corpus at text")
    return torch.cat(rows)


def train_sae(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ref: ModelRef,
              config: TrainSaeConfig) -> tuple[TrainResult, Path]:
    """Train on the hook's activations and write the SAELens folder; returns the metrics and the folder."""
    out = Path(config.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not config.overwrite:
        raise UsageError(f"{out}: already exists; choose another --out or pass --overwrite to replace it")
    if config.k < 1 or config.features < config.k:
        raise UsageError("--k must be at least 1 and at most --features")
    hook = resolve_hook(config.hook, model.base_model, model.config.model_type)
    acts = collect_activations(model, tokenizer, hook, Path(config.corpus), config.tokens, config.context_length,
                               config.batch_size, config.text_field, config.progress)
    torch.manual_seed(config.seed)
    result = train_topk_sae(acts, TrainConfig(n_features=config.features, k=config.k, steps=config.steps,
                                              seed=config.seed), progress=config.progress)
    folder = save_saelens_folder(result, out, hook_name=config.hook, model_name=ref.display_name,
                                 context_size=config.context_length, prepend_bos=tokenizer.bos_token_id is not None,
                                 dataset_path=str(config.corpus), overwrite=config.overwrite,
                                 extra_metadata={"hf_hook_name": hook.description})
    return result, folder


def _raise_stop(module: torch.nn.Module, args: object, output: object) -> None:
    raise _Stop
