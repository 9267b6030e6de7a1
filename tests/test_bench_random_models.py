"""bench/random_models.py's dictionaries load through the harvest's own loader and fire as documented: a top-k one
keeps k features a token, a --relu one about k (what bench/device_check.py's sae stage relies on to time both
co-occurrence paths)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from featureatlas.load.dictionaries import load_dictionaries

BENCH = Path(__file__).resolve().parents[1] / "bench" / "random_models.py"


@pytest.mark.parametrize("relu", [False, True], ids=["top-k", "relu"])
def test_random_dictionaries_fire_about_k_features_a_token(tmp_path: Path, relu: bool) -> None:
    spec = importlib.util.spec_from_file_location("bench_random_models", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    d_in, d_sae, k = 64, 512, 16
    folder = bench.make_sae(tmp_path / "sae", d_in, d_sae, k, "blocks.1.hook_resid_post", relu=relu)
    (dictionary,) = load_dictionaries(folder)
    assert (dictionary.most_nonzeros is None) == relu
    x = torch.randn(2_000, d_in, generator=torch.Generator().manual_seed(0)) * 7.0  # any scale: rescaled on input
    l0 = (dictionary.encode(x) != 0).sum(-1).float()
    if relu:
        assert 0.7 * k < l0.mean() < 1.3 * k and l0.max() > l0.min()  # about k, more on some tokens than others
    else:
        assert l0.max() <= k and l0.mean() > 0.9 * k
