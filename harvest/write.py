"""Writes what the accumulators hold into the store: a source's row, its units, histograms and examples."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from featureatlas.harvest.accumulators import Accumulators
from featureatlas.harvest.contexts import Context
from featureatlas.harvest.sources import UnitSource
from featureatlas.store.writer import StoreWriter

if TYPE_CHECKING:  # for type hints only: importing them takes seconds
    from transformers import PreTrainedTokenizerBase


class ContextLengths:
    """Token count of each kept context, looked up for whole arrays of ids at once."""

    def __init__(self, kept: dict[int, Context]):
        self.ids = np.array(sorted(kept), dtype=np.int64)
        self.lengths = np.array([len(kept[i].token_ids) for i in self.ids.tolist()], dtype=np.int64)

    def __call__(self, context_ids: np.ndarray) -> np.ndarray:
        """Every id asked for is kept (examples only reference kept contexts)."""
        return self.lengths[np.searchsorted(self.ids, context_ids)]


def write_source(store: StoreWriter, model: str, source: UnitSource, acc: Accumulators,
                 lengths: ContextLengths) -> None:
    """One source's row, its units' statistics and histograms, and every kind of example."""
    dictionary = source.dictionary
    store.add_source(
        model, source.name, source.layer, source.n_units, source.hook.description, kind=source.kind,
        hook_name=source.hook.name, signed=source.signed, histogram_every=acc.statistics.histogram_every,
        hook_out_name=dictionary.hook_out_name if dictionary is not None else None,
        dictionary_path=str(dictionary.path.resolve()) if dictionary is not None else None,  # usable from any cwd
        dictionary_format=dictionary.format if dictionary is not None else None,
        architecture=dictionary.architecture if dictionary is not None else None,
        config=dictionary.config if dictionary is not None else None)
    stats = {name: t.cpu().numpy() for name, t in acc.statistics.finish().items()}
    store.add_units(model, source.name, source.layer, max_activation=stats["max_activation"],
                    min_activation=stats["min_activation"], n_tokens=acc.statistics.n_tokens,
                    n_firing=stats["n_firing"], sum_activation=stats["sum_activation"],
                    sum_squares=stats["sum_squares"], n_examples=(acc.top.context_ids >= 0).sum(dim=1).cpu().numpy())
    store.add_histograms(model, source.name, source.layer, stats["counts"])
    rows = partial(_write_examples, store, model, source, lengths)
    rows("top", acc.top.values, acc.top.context_ids, acc.top.positions, acc.top.activations())
    if acc.bottom is not None:
        rows("bottom", -acc.bottom.values, acc.bottom.context_ids, acc.bottom.positions, acc.bottom.activations())
    for kind, reservoir in (("quantile", acc.quantiles), ("random", acc.random)):
        if reservoir is None:
            continue
        order = reservoir.keys.argsort(dim=2)  # within a bin, in sample order
        rows(kind, reservoir.values.gather(2, order), reservoir.context_ids.gather(2, order),
             reservoir.positions.gather(2, order),
             reservoir.activations.gather(2, order[..., None].expand_as(reservoir.activations)),
             interval=reservoir.intervals() if kind == "quantile" else None)


def _write_examples(store: StoreWriter, model: str, source: UnitSource, lengths: ContextLengths, kind: str,
                    values: torch.Tensor, context_ids: torch.Tensor, positions: torch.Tensor,
                    activations: torch.Tensor, interval: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """values/context_ids/positions [units, ..., n] in rank order per group; activations [..., n, width]."""
    ids = context_ids.cpu().numpy()
    filled = ids >= 0
    index = np.nonzero(filled)
    ranks = np.cumsum(filled, axis=-1)[index]
    acts = activations.float().cpu().numpy()[index]
    lo = hi = None
    if interval is not None:  # [units, bins] -> one per example
        lo = interval[0].cpu().numpy()[index[:-1]]
        hi = interval[1].cpu().numpy()[index[:-1]]
    store.add_examples(model, source.name, source.layer, kind, units=index[0], ranks=ranks,
                       context_ids=ids[index], positions=positions.cpu().numpy()[index],
                       values=values.float().cpu().numpy()[index], activations=acts,
                       context_lengths=lengths(ids[index]), interval_lo=lo, interval_hi=hi)


def write_logits(store: StoreWriter, model_name: str, source: UnitSource,
                 effects: tuple[torch.Tensor, ...] | None) -> set[int]:
    """The source's top and bottom logit effects (logits.logit_effects); returns the token ids they name."""
    if effects is None:
        return set()
    top_ids, top_values, bottom_ids, bottom_values = (t.cpu().numpy() for t in effects)
    store.add_logits(model_name, source.name, source.layer, "top", top_ids, top_values)
    store.add_logits(model_name, source.name, source.layer, "bottom", bottom_ids, bottom_values)
    return set(np.unique(top_ids).tolist()) | set(np.unique(bottom_ids).tolist())


def write_vocabulary(store: StoreWriter, model_name: str, tokenizer: PreTrainedTokenizerBase, token_ids: set[int]
                     ) -> None:
    """Display strings of the tokens the logit tables name (a lone byte of a multi-byte character reads as �)."""
    if token_ids:
        ids = sorted(token_ids)
        store.add_vocabulary(model_name, np.array(ids), tokenizer.batch_decode(
            [[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False))
