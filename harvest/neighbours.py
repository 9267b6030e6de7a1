"""Similar units by their weights: each unit's nearest others by cosine of a direction it reads or writes.

Dictionary features: by decoder row (what they write) and by encoder column (what they read); neurons: by their
row of the MLP output projection; across dictionaries of the same width, by decoder row (nearest_across). Exact
top-k over every pair, computed a block of rows at a time, so memory is a block x n scores however many units
there are. Ties go to the lower unit number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featureatlas.harvest.sources import UnitSource
from featureatlas.load.architectures import architecture_of, get_submodule, input_to_output_matrix

K = 10
BLOCK = 1024  # rows of scores at a time: BLOCK x n floats


@dataclass
class Neighbours:
    """For `units` of one source: their k nearest among `candidates` (possibly several sources)."""

    kind: str                 # 'decoder' | 'encoder' | 'output'
    index: torch.Tensor       # [units, k] row numbers into the candidates, best first
    score: torch.Tensor       # [units, k] cosine similarity


def directions(model: torch.nn.Module, source: UnitSource) -> dict[str, torch.Tensor]:
    """The directions a source's units can be compared by: kind -> [units, width] (float32)."""
    if source.dictionary is not None:
        t = source.dictionary.tensors
        encoder = t["W_enc"].T if "W_enc" in t else t["encoder.weight"]
        return {"decoder": source.dictionary.decoder.float(), "encoder": encoder.float()}
    if source.kind == "mlp":
        arch = architecture_of(model.config.model_type)
        proj = get_submodule(model.base_model, f"{arch.blocks}.{source.layer}.{arch.mlp_out_proj}")
        return {"output": input_to_output_matrix(proj).float()}
    return {}  # residual dimensions are orthogonal by construction; heads have no single direction


def nearest(vectors: torch.Tensor, candidates: torch.Tensor | None = None, k: int = K,
            exclude_self: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine of each row of vectors among the rows of candidates (default: vectors themselves, each row
    excluded from its own list). Zero rows have cosine 0 with everything."""
    same = candidates is None
    a = torch.nn.functional.normalize(vectors.float(), dim=1)
    b = a if same else torch.nn.functional.normalize(candidates.float(), dim=1)
    k = min(k, b.shape[0] - (1 if same and exclude_self else 0))
    indices, scores = [], []
    for start in range(0, a.shape[0], BLOCK):
        sims = a[start:start + BLOCK] @ b.T
        if same and exclude_self:
            rows = torch.arange(sims.shape[0], device=sims.device)
            sims[rows, rows + start] = -torch.inf
        # Stable order: by score, then by lower index (a sort of the top 2k, so ties at the cut resolve too).
        top = sims.topk(min(b.shape[0], 2 * k), dim=1)
        order = torch.argsort(top.indices, dim=1, stable=True)
        idx, val = top.indices.gather(1, order), top.values.gather(1, order)
        order = torch.argsort(-val, dim=1, stable=True)[:, :k]
        indices.append(idx.gather(1, order))
        scores.append(val.gather(1, order))
    return torch.cat(indices), torch.cat(scores)


def nearest_across(vectors: torch.Tensor, candidate_sets: list[torch.Tensor], k: int = K
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """nearest() among the rows of every candidate set together, numbered as if concatenated in order, computed
    a set at a time: memory is that of the largest set, however many there are. Ties go to the lower number."""
    index = torch.zeros((vectors.shape[0], 0), dtype=torch.int64, device=vectors.device)
    score = torch.zeros((vectors.shape[0], 0), dtype=torch.float32, device=vectors.device)
    offset = 0
    for candidates in candidate_sets:
        i, s = nearest(vectors, candidates, k=k, exclude_self=False)
        # Earlier sets' rows come first and number lower: a stable sort by score keeps ties in number order.
        index, score = torch.cat([index, i.to(index.device) + offset], 1), torch.cat([score, s.to(score.device)], 1)
        order = torch.argsort(-score, dim=1, stable=True)[:, :k]
        index, score = index.gather(1, order), score.gather(1, order)
        offset += candidates.shape[0]
    return index, score


def source_neighbours(model: torch.nn.Module, source: UnitSource, k: int = K) -> list[Neighbours]:
    """Every kind of weight neighbour a source's units have, within the source."""
    return [Neighbours(kind, *nearest(vectors, k=k)) for kind, vectors in directions(model, source).items()]
