"""How a source's units relate, written beside their examples: each unit's nearest by every kind of weight
direction (harvest/neighbours.py), and, for a dictionary, its features' places on a map (harvest/layout.py; one
map per dictionary: a model has many layers of neurons, and each map costs seconds)."""

from __future__ import annotations

import torch

from featureatlas.harvest.layout import source_layout
from featureatlas.harvest.neighbours import directions, nearest
from featureatlas.harvest.sources import UnitSource
from featureatlas.store.writer import StoreWriter


def write_relations(store: StoreWriter, model_name: str, model: torch.nn.Module, source: UnitSource,
                    seed: int) -> None:
    for kind, vectors in directions(model, source).items():
        index, score = nearest(vectors)
        store.add_neighbours(model_name, source.name, source.layer, kind, index.cpu().numpy(), score.cpu().numpy())
    if source.dictionary is not None:
        laid = source_layout(model, source, seed)
        if laid is not None:
            store.add_layout(model_name, source.name, source.layer, *laid)
