"""How a source's units relate, written beside their examples: each unit's nearest by every kind of weight
direction (harvest/neighbours.py), for a dictionary the features that fire on the same tokens (counted during the
harvest: harvest/cooccurrence.py), and its features' places on a map (harvest/layout.py; one map per dictionary:
a model has many layers of neurons, and each map costs seconds). Asked for, also each dictionary feature's
nearest features in the other dictionaries of the same width (`decoder_across`)."""

from __future__ import annotations

import torch

from featureatlas.harvest.cooccurrence import CoOccurrence
from featureatlas.harvest.layout import source_layout
from featureatlas.harvest.neighbours import K, directions, nearest, nearest_across
from featureatlas.harvest.sources import UnitSource
from featureatlas.store.writer import StoreWriter


def write_relations(store: StoreWriter, model_name: str, model: torch.nn.Module, source: UnitSource,
                    seed: int, cooccurrence: CoOccurrence | None = None) -> None:
    for kind, vectors in directions(model, source).items():
        index, score = nearest(vectors)
        store.add_neighbours(model_name, source.name, source.layer, kind, index.cpu().numpy(), score.cpu().numpy())
    if cooccurrence is not None:
        index, score = cooccurrence.nearest(K)
        store.add_neighbours(model_name, source.name, source.layer, "cooccurrence", index.numpy(), score.numpy())
    if source.dictionary is not None:
        laid = source_layout(model, source, seed)
        if laid is not None:
            store.add_layout(model_name, source.name, source.layer, *laid)


def write_neighbours_across(store: StoreWriter, model_name: str, sources: list[UnitSource], k: int = K) -> None:
    """Each dictionary feature's k nearest features by decoder cosine among every other dictionary whose decoder
    rows are as wide (kind 'decoder_across'; other_source and other_layer say where each one is)."""
    dictionaries = [s for s in sources if s.dictionary is not None]
    for source in dictionaries:
        decoder = source.dictionary.decoder
        others = [s for s in dictionaries if s is not source and s.dictionary.decoder.shape[1] == decoder.shape[1]]
        if not others:
            continue
        index, score = nearest_across(decoder, [s.dictionary.decoder for s in others], k)
        rows = [(s.name, s.layer, unit) for s in others for unit in range(s.n_units)]
        store.add_neighbours(model_name, source.name, source.layer, "decoder_across", index.cpu().numpy(),
                             score.cpu().numpy(), other=rows)


def cooccurrence_record(sources: list[UnitSource], parts: list[CoOccurrence | None]) -> dict[str, list]:
    """What the run's settings record of the co-occurrence counted: [source, layer, complete] per dictionary
    (complete: every pair counted exactly; else the rarest pairs were dropped to bound memory). {} when none."""
    counted = [[s.name, s.layer, part.complete] for s, part in zip(sources, parts, strict=True) if part is not None]
    return {"cooccurrence_complete": counted} if counted else {}
