"""Probe: what a unit (or the units of one source and layer) does on a text of the user's own.

A probe must show the numbers the catalogue shows, or a unit's page and a probe of the same words would disagree.
So the text becomes one context exactly as a harvest makes one (the tokenizer's BOS first when it has one, the
text's tokens without special tokens; the BOS position never counts as the max), the sources are the harvest's
own (build_sources; from a store, its run reopened by harvest/reopen.py, as verify reopens it) and the activations
come from harvest's own Reader, which also stops the forward pass after the deepest layer asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from featureatlas.errors import UsageError, setting_name
from featureatlas.harvest.ablation import Ablated, ablate
from featureatlas.harvest.contexts import Context, display_tokens, make_batch
from featureatlas.harvest.harvester import Reader
from featureatlas.harvest.sources import UnitSource, mlp_sources, resid_sources
from featureatlas.harvest.steer import Steered, steer
from featureatlas.load.architectures import blocks_of
from featureatlas.load.models import ModelLoadError, check_length
from featureatlas.store.addresses import AddressError, SourceLayer, describe_sources, format_address, parse_address

if TYPE_CHECKING:  # for type hints only: importing them takes seconds
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MAX_CHARS = 20_000   # checked before tokenising, so a huge paste costs nothing
MAX_TOKENS = 2_048   # one forward pass; seconds on a CPU for the embedded model


@dataclass(frozen=True)
class UnitProbe:
    """One unit's activation on every token of a text (BOS included, as a stored example's are)."""

    model: str
    source: str
    layer: int
    unit: int
    tokens: list[str]          # display strings, joining up to the text (after BOS)
    token_ids: list[int]
    activations: np.ndarray    # float32 [tokens]
    first_counted: int         # 1 when tokens[0] is BOS, which never counts as the max
    scale: float | None = None  # the unit's largest activation in the store (None: not known)

    @property
    def address(self) -> str:
        return format_address(self.model, self.source, self.layer, self.unit)

    @property
    def max_position(self) -> int:
        """The first max over counted tokens, as harvest picks an example's max_position."""
        return int(self.activations[self.first_counted:].argmax()) + self.first_counted

    @property
    def max_activation(self) -> float:
        return float(self.activations[self.max_position])


@dataclass(frozen=True)
class TopUnit:
    """A unit of a (source, layer) ranked by its max activation over a text's counted tokens."""

    model: str
    source: str
    layer: int
    unit: int
    max_activation: float
    position: int
    token: str

    @property
    def address(self) -> str:
        return format_address(self.model, self.source, self.layer, self.unit)


def pick_source(held: list[SourceLayer], source: str, layer: int | None) -> tuple[str, int]:
    """The (source, layer) a --top asks for among those held (a source with one layer may leave the layer out)."""
    layers = sorted({s.layer for s in held if s.source == source})
    if not layers:
        raise UsageError(f"{setting_name('source')} {source!r}: no such source; there are {describe_sources(held)}")
    has = describe_sources([s for s in held if s.source == source])
    if layer is None and len(layers) > 1:
        raise UsageError(f"{setting_name('source')} {source} has several layers ({has}); pass {setting_name('layer')}")
    if layer is not None and layer not in layers:
        raise UsageError(f"{setting_name('layer')} {layer}: no such layer in {source}; there is {has}")
    return source, layers[0] if layer is None else layer


def check_text(text: str) -> str:
    """Refuse what no probe can use before any model loads."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("no text to probe; pass some text (or - to read it from stdin)")
    if len(text) > MAX_CHARS:
        raise UsageError(f"the text is {len(text):,} characters; probe takes at most {MAX_CHARS:,}")
    return text


@dataclass
class Prober:
    """A loaded model and the sources it can read, ready for any number of probes."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_name: str                              # the store's `model` column (the ref's display name)
    sources: dict[tuple[str, int], UnitSource]   # (source name, layer) -> source
    store: Path | None = None                    # where the units' own max activations are read from

    _scales: dict[tuple[str, int, int], float] | None = None

    def scale(self, source: str, layer: int, unit: int) -> float | None:
        """The unit's largest activation in the store (its |min| if it never fires positive): what shades are
        scaled to, so a probe reads like the unit's page. None without a store, or if the store lacks the unit.
        All units' are read at the first call, in one query: the store is not held open between probes."""
        if self.store is None:
            return None
        if self._scales is None:
            from featureatlas.store.schema import open_store
            con = open_store(self.store)
            try:
                rows = con.execute("SELECT source, layer, unit, max_activation, min_activation FROM units "
                                   "WHERE model = ?", [self.model_name]).fetchall()
            finally:
                con.close()
            self._scales = {(s, la, u): float(hi) if hi is not None and hi > 0 else float(-(lo or 0.0))
                            for s, la, u, hi, lo in rows}
        return self._scales.get((source, layer, unit)) or None

    @property
    def has_bos(self) -> bool:
        return self.tokenizer.bos_token_id is not None

    def source_layers(self) -> list[SourceLayer]:
        """What parse_address reads addresses against."""
        return [SourceLayer(self.model_name, name, layer, s.n_units) for (name, layer), s in self.sources.items()]

    def resolve(self, address: str) -> tuple[str, str, int, int]:
        """(model, source, layer, unit) of an address; an unknown or out-of-range unit is a UsageError."""
        try:
            return parse_address(address, self.source_layers())
        except AddressError as err:
            raise UsageError(str(err)) from None

    def steer(self, text: str, address: str, value: float, mode: str = "add", max_new_tokens: int = 30,
              seed: int | None = None) -> Steered:
        """The text's continuation with the unit pushed (harvest/steer.py), beside the unpushed one."""
        _, source, layer, unit = self.resolve(address)
        ids = self.token_ids(text)
        try:  # the continuation must fit the model's positions too
            check_length(self.model, len(ids) + max_new_tokens, "the text and its continuation", "steer a shorter "
                         "text or ask for fewer new tokens")
        except ModelLoadError as err:
            raise UsageError(str(err)) from None
        return steer(self.model, self.tokenizer, self.sources[(source, layer)], unit, ids, text, value, mode,
                     max_new_tokens, seed)

    def ablate(self, address: str, token_ids: list[int], position: int) -> Ablated:
        """The change in log p of each token after `position` when the unit is removed there (harvest/ablation.py)."""
        _, source, layer, unit = self.resolve(address)
        try:
            check_length(self.model, len(token_ids), "the context", "ablate a shorter one")
        except ModelLoadError as err:
            raise UsageError(str(err)) from None
        return ablate(self.model, self.sources[(source, layer)], unit, token_ids, position)

    def context_token_ids(self, context_id: int) -> list[int]:
        """A stored context's token ids (BOS included), if an example of this model shows it."""
        if self.store is None:
            raise UsageError(f"no store to read contexts from: start with {setting_name('store')} STORE "
                             "(open_atlas in a notebook)")
        from featureatlas.store.schema import open_store
        con = open_store(self.store)
        try:
            rows = con.execute("SELECT c.token_ids FROM contexts c WHERE c.context_id = ? AND EXISTS (SELECT 1 FROM "
                               "examples e WHERE e.model = ? AND e.context_id = c.context_id)",
                               [context_id, self.model_name]).fetchall()
        finally:
            con.close()
        if not rows:
            raise UsageError(f"context {context_id}: no example of {self.model_name} in {self.store.name} shows it")
        return list(rows[0][0])

    def resolve_source(self, source: str, layer: int | None) -> tuple[str, int]:
        return pick_source(self.source_layers(), source, layer)

    def token_ids(self, text: str) -> list[int]:
        """BOS (when the tokenizer has one) + the text's tokens, as harvest's contexts are made."""
        ids = self.tokenizer(check_text(text), add_special_tokens=False)["input_ids"]
        if len(ids) > MAX_TOKENS:
            raise UsageError(f"the text is {len(ids):,} tokens; probe takes at most {MAX_TOKENS:,}")
        ids = ([self.tokenizer.bos_token_id] if self.has_bos else []) + list(ids)
        try:
            check_length(self.model, len(ids), "the text", "probe a shorter text")
        except ModelLoadError as err:
            raise UsageError(str(err)) from None
        return ids

    def activations(self, token_ids: list[int], keys: list[tuple[str, int]]) -> dict[tuple[str, int], np.ndarray]:
        """float32 [tokens, units] per (source, layer), read by harvest's Reader: up to the deepest layer only."""
        if not token_ids:
            raise UsageError("no tokens to probe")
        wanted = [self.sources[k] for k in keys]
        captured: dict[tuple[str, int], np.ndarray] = {}

        def consume(i: int, acts: torch.Tensor) -> None:
            captured[keys[i]] = acts[0].float().cpu().numpy().copy()

        reader = Reader(self.model, wanted, consume)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        try:
            reader.run(make_batch([Context(0, 0, 0, list(token_ids))], self.has_bos, pad))
        finally:
            reader.detach()
        return captured

    def _first(self, ids: list[int]) -> int:
        """1 when the context starts with BOS (never a max), as harvest counts positions."""
        return int(self.has_bos and len(ids) > 1 and ids[0] == self.tokenizer.bos_token_id)

    def display(self, token_ids: list[int]) -> list[str]:
        return display_tokens(self.tokenizer, [list(token_ids)])[0]

    def unit(self, text: str | None, address: str, token_ids: list[int] | None = None) -> UnitProbe:
        """One unit on a text (or on given token ids, BOS included: a stored context's, say)."""
        model, source, layer, unit = self.resolve(address)
        ids = token_ids if token_ids is not None else self.token_ids(text)
        acts = self.activations(ids, [(source, layer)])[(source, layer)][:, unit]
        return UnitProbe(model, source, layer, unit, self.display(ids), list(ids), acts, self._first(ids),
                         self.scale(source, layer, unit))

    def top(self, text: str | None, source: str, layer: int | None, n: int,
            token_ids: list[int] | None = None) -> list[TopUnit]:
        """The n units of (source, layer) with the largest max over the text's counted tokens (ties: lower unit
        first)."""
        if n < 1:
            raise UsageError(f"{setting_name('top')} must be at least 1")
        name, layer = self.resolve_source(source, layer)
        ids = token_ids if token_ids is not None else self.token_ids(text)
        acts = self.activations(ids, [(name, layer)])[(name, layer)]
        first = self._first(ids)
        counted = acts[first:]
        peaks = counted.max(axis=0)
        positions = counted.argmax(axis=0) + first
        order = np.lexsort((np.arange(len(peaks)), -peaks.astype(np.float64)))[:n]
        tokens = self.display(ids)
        return [TopUnit(self.model_name, name, layer, int(u), float(peaks[u]), int(positions[u]),
                        tokens[positions[u]]) for u in order]


def load_prober(model: str | None = None, saes: list[str] | None = None, *, store: Path | str | None = None,
                device: str = "auto", dtype: str = "auto", model_name: str | None = None) -> Prober:
    """From a store: its run (of `model_name`, in a store of several models) reopened by harvest/reopen.py, with
    `model` and `saes` saying where the model and dictionaries are now. Without: `model` with every MLP layer,
    every residual layer and each `saes` dictionary, in `dtype` (neurons and residual dimensions need no check
    forward pass)."""
    if store is not None:
        from featureatlas.harvest.reopen import reopen_store  # harvest's machinery: loaded only when used

        reopened = reopen_store(store, model_name=model_name, model=model, saes=list(saes or []), device=device)
        return Prober(reopened.model, reopened.tokenizer, reopened.run.model, reopened.sources, Path(store))
    if model is None:
        raise UsageError(f"pass {setting_name('model')} MODEL or {setting_name('store')} STORE")
    from featureatlas.harvest.config import HarvestConfig
    from featureatlas.harvest.run import build_sources
    from featureatlas.load.models import load_model, pick_device, pick_dtype, resolve_model

    torch_device = pick_device(device)
    ref = resolve_model(model)
    loaded, tokenizer = load_model(ref, torch_device, pick_dtype(dtype, torch_device))
    backbone, model_type = loaded.base_model, loaded.config.model_type
    every = list(range(len(blocks_of(backbone, model_type))))
    built = mlp_sources(backbone, model_type, every) + resid_sources(backbone, model_type, every,
                                                                     loaded.config.hidden_size)
    if saes:  # harvest's own loading and checks (d_in against the hooked tensor) for the dictionaries
        config = HarvestConfig(model=model, corpus=Path("."), out=Path("."), layers="none", saes=list(saes),
                               device=str(torch_device))
        built += build_sources(loaded, config, torch_device)
    return Prober(loaded, tokenizer, ref.display_name, {(s.name, s.layer): s for s in built})
