"""Weight neighbours, exact against a brute-force computation over every pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from featureatlas.harvest import neighbours
from featureatlas.harvest.neighbours import nearest, nearest_across, source_neighbours
from featureatlas.harvest.sources import dictionary_sources, mlp_sources
from featureatlas.load.dictionaries import load_dictionaries

from helpers.tiny_models import HIDDEN, saelens_sae, save_tiny_model


def brute_force(vectors: np.ndarray, candidates: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    same = candidates is None
    candidates = vectors if same else candidates
    a = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    b = candidates / np.maximum(np.linalg.norm(candidates, axis=1, keepdims=True), 1e-12)
    sims = a @ b.T
    index, score = [], []
    for i, row in enumerate(sims):
        order = [j for j in np.lexsort((np.arange(len(row)), -row)) if not (same and j == i)][:k]
        index.append(order)
        score.append(row[order])
    return np.array(index), np.array(score)


@pytest.mark.parametrize("n, m, block", [(37, None, 8), (300, None, 1024), (50, 70, 16)])
def test_nearest_is_the_brute_force_top_k(n: int, m: int | None, block: int, monkeypatch) -> None:
    monkeypatch.setattr(neighbours, "BLOCK", block)  # several blocks, and one
    g = torch.Generator().manual_seed(n)
    vectors = torch.randn(n, 12, generator=g, dtype=torch.float64)
    candidates = None if m is None else torch.randn(m, 12, generator=g, dtype=torch.float64)
    index, score = nearest(vectors, candidates, k=10)
    want_index, want_score = brute_force(vectors.numpy(), None if candidates is None else candidates.numpy(), 10)
    assert index.tolist() == want_index.tolist()
    np.testing.assert_allclose(score.numpy(), want_score, rtol=1e-5, atol=1e-6)


def test_ties_go_to_the_lower_unit_and_duplicates_are_found() -> None:
    vectors = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    index, score = nearest(vectors, k=2)
    assert index.tolist() == [[1, 3], [0, 3], [4, 0], [0, 1], [2, 0]]
    assert score[0].tolist() == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("sizes, k, block", [((30, 7, 45), 10, 8), ((3, 4), 10, 1024), ((12,), 5, 4)])
def test_nearest_across_sets_is_the_brute_force_top_k_of_them_all(sizes: tuple[int, ...], k: int, block: int,
                                                                  monkeypatch) -> None:
    monkeypatch.setattr(neighbours, "BLOCK", block)
    g = torch.Generator().manual_seed(sum(sizes))
    vectors = torch.randn(25, 12, generator=g, dtype=torch.float64)
    sets = [torch.randn(m, 12, generator=g, dtype=torch.float64) for m in sizes]
    index, score = nearest_across(vectors, sets, k=k)
    want_index, want_score = brute_force(vectors.numpy(), torch.cat(sets).numpy(), k)
    assert index.shape == (25, min(k, sum(sizes)))
    assert index.tolist() == want_index.tolist()
    np.testing.assert_allclose(score.numpy(), want_score, rtol=1e-5, atol=1e-6)


def test_nearest_across_ties_go_to_the_earlier_set_and_lower_row() -> None:
    vectors = torch.tensor([[1.0, 0.0]])
    sets = [torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 3.0]])]
    index, score = nearest_across(vectors, sets, k=4)
    assert index.tolist() == [[1, 2, 3, 0]] and score[0, :3].tolist() == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.model
def test_sources_are_compared_by_their_own_weights(tmp_path: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(save_tiny_model("llama", tmp_path / "m")).eval()
    (mlp,) = mlp_sources(model.base_model, "llama", [1])
    sae_folder = saelens_sae(tmp_path / "sae", HIDDEN, "blocks.1.hook_resid_post")
    (sae,) = dictionary_sources([("res1", d) for d in load_dictionaries(sae_folder)], model.base_model, "llama",
                                torch.device("cpu"))
    (output,) = source_neighbours(model, mlp)
    rows = model.model.layers[1].mlp.down_proj.weight.T.detach().numpy()  # [neurons, d_model]
    assert output.kind == "output" and output.index.tolist() == brute_force(rows, None, 10)[0].tolist()
    decoder, encoder = source_neighbours(model, sae)
    d = sae.dictionary.tensors
    assert decoder.index.tolist() == brute_force(d["W_dec"].numpy(), None, 10)[0].tolist()
    assert encoder.index.tolist() == brute_force(d["W_enc"].T.numpy(), None, 10)[0].tolist()
