"""Train a dictionary on a model: collect a hook's activations over a corpus, train a top-k SAE and save it for
SAELens; or (transcode) collect a module's input and output, train a top-k transcoder and save it as sparsify does.
The settings and their defaults are TrainSaeConfig's (harvest/config.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import tqdm

from featureatlas.errors import UsageError, setting_name
from featureatlas.harvest.config import TrainSaeConfig, validate_training
from featureatlas.harvest.contexts import iter_batches, iter_contexts
from featureatlas.harvest.hooks import Hook, read_hook, resolve_hook
from featureatlas.harvest.train_sae import (
    TrainConfig,
    TrainResult,
    save_saelens_folder,
    save_sparsify_folder,
    train_topk_sae,
)
from featureatlas.load.architectures import blocks_of
from featureatlas.load.corpus import iter_documents
from featureatlas.load.models import ModelRef, load_model, pick_device, pick_dtype, resolve_model

if TYPE_CHECKING:  # for type hints only: importing them takes seconds
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class _Stop(Exception):
    pass


def collect_activations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, hooks: list[Hook],
                        corpus: Path, tokens: int, context_length: int, batch_size: int, text_field: str,
                        progress: bool = True) -> list[torch.Tensor]:
    """Per hook, [n, width] float32 on the CPU: its vector at every counted token (BOS and padding never count),
    from the same contexts a harvest makes, rows aligned across hooks; the forward pass stops after the last
    hook's block."""
    backbone = model.base_model
    device = next(model.parameters()).device
    has_bos = tokenizer.bos_token_id is not None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows: list[list[torch.Tensor]] = [[] for _ in hooks]
    counted: list[torch.Tensor] = []

    def keeper(i: int):  # noqa: ANN202 - a hook callback
        def keep(tensor: torch.Tensor) -> None:
            mask = counted[0]
            rows[i].append(tensor.reshape(*mask.shape, -1)[mask].float().cpu())
        return keep

    handles = [read_hook(backbone, hook, keeper(i)) for i, hook in enumerate(hooks)]
    last = max(hook.layer for hook in hooks)
    stop = blocks_of(backbone, model.config.model_type)[last].register_forward_hook(_raise_stop)
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
        for handle in handles:
            handle.remove()
        stop.remove()
    if not rows[0]:
        raise UsageError(f"{corpus}: holds no text to train on; point {setting_name('corpus')} at text")
    return [torch.cat(parts) for parts in rows]


def train_sae(config: TrainSaeConfig, loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelRef] | None = None
              ) -> tuple[TrainResult, Path]:
    """Train on the hook's activations and write the SAELens folder (a transcoder: the module's input and output,
    and the sparsify folder); returns the metrics and the folder of the dictionary, which `harvest --sae` reads.
    loaded: the model, tokenizer and ref already in memory (the demo trains twice and harvests on one model)."""
    validate_training(config)
    if loaded is None:
        device = pick_device(config.device)
        ref = resolve_model(config.model)
        model, tokenizer = load_model(ref, device, pick_dtype(config.dtype, device))
    else:
        model, tokenizer, ref = loaded
    out = Path(config.out)
    backbone, model_type = model.base_model, model.config.model_type
    if config.transcode:
        hooks = [resolve_hook(config.hook, backbone, model_type, reads=reads) for reads in ("input", "output")]
    else:
        hooks = [resolve_hook(config.hook, backbone, model_type)]
    collected = collect_activations(model, tokenizer, hooks, Path(config.corpus), config.tokens,
                                    config.context_length, config.batch_size, config.text_field, config.progress)
    torch.manual_seed(config.seed)
    result = train_topk_sae(collected[0], TrainConfig(n_features=config.features, k=config.k, steps=config.steps,
                                                      seed=config.seed), progress=config.progress,
                            targets=collected[1] if config.transcode else None)
    if config.transcode:
        return result, save_sparsify_folder(result, out, hookpoint=hooks[0].module, overwrite=config.overwrite)
    folder = save_saelens_folder(result, out, hook_name=config.hook, model_name=ref.display_name,
                                 context_size=config.context_length, prepend_bos=tokenizer.bos_token_id is not None,
                                 dataset_path=str(config.corpus), overwrite=config.overwrite,
                                 extra_metadata={"hf_hook_name": hooks[0].description})
    return result, folder


def _raise_stop(module: torch.nn.Module, args: object, output: object) -> None:
    raise _Stop
