"""The top-k SAE trainer learns truly sparse data, and SAELens itself loads what it saves with the same encode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from featureatlas.harvest.train_sae import (
    REPORT_FILENAME,
    SEED_SIMILARITY,
    TrainConfig,
    TrainResult,
    _Chosen,
    _seed_rows,
    decode,
    encode_topk,
    save_saelens_folder,
    save_sparsify_folder,
    train_topk_sae,
)

from helpers.tiny_models import one_thread

CONFIG = TrainConfig(n_features=128, k=4, batch_size=1024, steps=300)
SAVE_ARGS = dict(hook_name="blocks.1.hook_resid_post", model_name="tiny/lm", context_size=64, prepend_bos=True,
                 dataset_path="corpus/")


torch_on_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def sparse_data(n: int = 20_000, d: int = 32, n_true: int = 64, active: int = 3, seed: int = 0) -> torch.Tensor:
    """Tokens that really are sparse: 3 of 64 random unit directions with positive weights, an offset and noise."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_true, d, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, n_true, generator=gen).argsort(dim=1)[:, :active]
    codes = torch.zeros(n, n_true).scatter_(1, chosen, torch.rand(n, active, generator=gen) + 0.5)
    return codes @ dictionary + 1.0 + 0.01 * torch.randn(n, d, generator=gen)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return sparse_data()


@pytest.fixture(scope="module")
def trained(data: torch.Tensor) -> TrainResult:
    return train_topk_sae(data, CONFIG, progress=False)


def test_learns_sparse_data_and_reports_heldout_metrics(data: torch.Tensor, trained: TrainResult) -> None:
    untrained = train_topk_sae(data, TrainConfig(n_features=128, k=4, steps=0), progress=False)
    assert trained.fvu < 0.1, trained.fvu
    assert trained.fvu < 0.25 * untrained.fvu, (trained.fvu, untrained.fvu)  # not vacuous: training did it
    assert trained.l0 == CONFIG.k and trained.steps == 300
    assert 0.0 <= trained.dead_fraction < 1.0
    assert trained.W_enc.shape == (32, 128) and trained.W_dec.shape == (128, 32)
    torch.testing.assert_close(trained.W_dec.norm(dim=1), torch.ones(128))
    # The reported numbers are those of the held-out rows (the last 10%), with the encode that is saved.
    heldout = data[-trained.n_heldout:]
    assert trained.n_heldout == 2_000 and trained.n_train == 18_000
    z = encode_topk(heldout, trained.W_enc, trained.b_enc, trained.b_dec, trained.k)
    error = (heldout - decode(z, trained.W_dec, trained.b_dec)).pow(2).sum()
    assert error / (heldout - heldout.mean(0)).pow(2).sum() == pytest.approx(trained.fvu, rel=1e-4)
    assert trained.dead_fraction == pytest.approx(1 - (z > 0).any(0).float().mean().item())


def test_sparse_backward_equals_autograd() -> None:
    """The trainer's hand-written gradient of the chosen pre-activations is autograd's dense one."""
    gen = torch.Generator().manual_seed(0)
    x, upstream = torch.randn(64, 16, generator=gen), torch.randn(64, 5, generator=gen)
    grads = []
    for sparse in (True, False):
        W_enc = torch.randn(16, 40, generator=torch.Generator().manual_seed(1)).requires_grad_()
        bias = torch.randn(40, generator=torch.Generator().manual_seed(2)).requires_grad_()
        pre = torch.addmm(bias, x, W_enc)
        indices = pre.detach().topk(5, dim=-1).indices
        chosen = _Chosen.apply(pre.detach(), indices, x, W_enc, bias) if sparse else pre.gather(1, indices)
        (chosen * upstream).sum().backward()
        grads.append((chosen.detach(), W_enc.grad, bias.grad))
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference)


def test_same_seed_same_weights(data: torch.Tensor) -> None:
    config = TrainConfig(n_features=128, k=4, batch_size=512, steps=40)
    first, second = (train_topk_sae(data[:4000], config, progress=False) for _ in range(2))
    other = train_topk_sae(data[:4000], TrainConfig(n_features=128, k=4, batch_size=512, steps=40, seed=1),
                           progress=False)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not torch.equal(first.W_dec, other.W_dec)


def test_saelens_loads_the_folder_with_the_same_encode(trained: TrainResult, tmp_path: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    folder = save_saelens_folder(trained, tmp_path / "sae", **SAVE_ARGS, extra_metadata={"hf_hook_name": "x"})
    sae = sae_lens.SAE.load_from_disk(folder)
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.k == trained.k
    assert sae.cfg.metadata.hook_name == SAVE_ARGS["hook_name"] and sae.cfg.metadata.hf_hook_name == "x"
    x = torch.randn(500, 32) * 2 + 1
    ours = encode_topk(x, trained.W_enc, trained.b_enc, trained.b_dec, trained.k)
    with torch.no_grad():
        theirs = sae.encode(x)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
        torch.testing.assert_close(sae.decode(theirs), decode(ours, trained.W_dec, trained.b_dec))
        torch.testing.assert_close(sae(x), decode(ours, trained.W_dec, trained.b_dec))

    # The same keys SAELens writes when it saves a TopKSAE itself (ours add model and training details).
    reference = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=32, d_sae=128, k=4))
    reference.save_model(tmp_path / "reference")
    expected = json.loads((tmp_path / "reference" / "cfg.json").read_text())
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg.keys() == expected.keys()
    assert expected["metadata"].keys() <= cfg["metadata"].keys()
    assert {key: cfg[key] for key in ("architecture", "normalize_activations", "apply_b_dec_to_input",
                                      "rescale_acts_by_decoder_norm")} == {
        "architecture": "topk", "normalize_activations": "none", "apply_b_dec_to_input": True,
        "rescale_acts_by_decoder_norm": False}
    report = json.loads((folder / REPORT_FILENAME).read_text())
    assert report["fvu"] == trained.fvu and report["steps"] == 300 and report["tokens_heldout"] == 2_000


def test_save_refuses_a_non_empty_folder_and_leaves_nothing_behind(trained: TrainResult, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    folder = save_saelens_folder(trained, tmp_path / "empty", **SAVE_ARGS)  # an empty folder is fine
    weights = (folder / "sae_weights.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        save_saelens_folder(trained, folder, **SAVE_ARGS)
    assert (folder / "sae_weights.safetensors").read_bytes() == weights

    retrained = TrainResult(**{**vars(trained), "W_dec": -trained.W_dec})
    save_saelens_folder(retrained, folder, **SAVE_ARGS, overwrite=True)
    assert (folder / "sae_weights.safetensors").read_bytes() != weights

    with pytest.raises(TypeError):  # fails midway (cfg.json cannot be written), after the weights
        save_saelens_folder(trained, tmp_path / "broken", **SAVE_ARGS, extra_metadata={"bad": object()})
    with pytest.raises(TypeError):  # and a failed overwrite keeps the previous folder
        save_saelens_folder(trained, folder, **SAVE_ARGS, extra_metadata={"bad": object()}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["cfg.json", "sae_weights.safetensors",
                                                               REPORT_FILENAME])


def test_a_transcoder_learns_a_sparse_map_and_its_sparsify_folder_encodes_the_same(tmp_path: Path) -> None:
    """Targets that are another sparse code's image (a module's output as a sparse function of its input): the
    transcoder predicts them, not its input; the folder is sparsify's layout, which the harvest's loader reads
    as a transcoder of the module with the very encode that was trained (no b_dec subtracted)."""
    from featureatlas.load.dictionaries import load_dictionaries

    gen = torch.Generator().manual_seed(1)
    n, d, n_true = 20_000, 32, 64
    inputs, outputs = (torch.randn(n_true, d, generator=gen) for _ in range(2))
    inputs, outputs = inputs / inputs.norm(dim=1, keepdim=True), outputs / outputs.norm(dim=1, keepdim=True)
    chosen = torch.rand(n, n_true, generator=gen).argsort(dim=1)[:, :3]
    codes = torch.zeros(n, n_true).scatter_(1, chosen, torch.rand(n, 3, generator=gen) + 0.5)
    x = codes @ inputs + 1.0 + 0.01 * torch.randn(n, d, generator=gen)
    y = codes @ outputs - 0.5
    config = TrainConfig(n_features=128, k=4, batch_size=1024, steps=300)
    trained = train_topk_sae(x, config, progress=False, targets=y)
    untrained = train_topk_sae(x, TrainConfig(n_features=128, k=4, steps=0), progress=False, targets=y)
    assert trained.transcoder and trained.fvu < 0.3 and trained.fvu < 0.25 * untrained.fvu, (trained.fvu,
                                                                                              untrained.fvu)
    z = encode_topk(x[-2_000:], trained.W_enc, trained.b_enc, None, trained.k)  # the held-out rows, as reported
    heldout_y = y[-2_000:]
    error = (heldout_y - decode(z, trained.W_dec, trained.b_dec)).pow(2).sum()
    assert error / (heldout_y - heldout_y.mean(0)).pow(2).sum() == pytest.approx(trained.fvu, rel=1e-4)

    with pytest.raises(ValueError, match="save_sparsify_folder"):
        save_saelens_folder(trained, tmp_path / "saelens", **SAVE_ARGS)
    folder = save_sparsify_folder(trained, tmp_path / "run", hookpoint="layers.1.mlp")
    assert folder == tmp_path / "run" / "layers.1.mlp"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["transcode"] is True and cfg["activation"] == "topk" and cfg["num_latents"] == 128
    [dictionary] = load_dictionaries(tmp_path / "run")
    assert (dictionary.kind, dictionary.format, dictionary.architecture) == ("transcoder", "sparsify",
                                                                             "topk_transcoder")
    assert (dictionary.hook_name, dictionary.hook_reads, dictionary.hook_out_name) == ("layers.1.mlp", "input",
                                                                                      "layers.1.mlp")
    probe = torch.randn(500, d, generator=gen) * 2 + 1
    torch.testing.assert_close(dictionary.encode(probe),
                               encode_topk(probe, trained.W_enc, trained.b_enc, None, trained.k), rtol=0, atol=0)
    report = json.loads((folder / REPORT_FILENAME).read_text())
    assert report["fvu"] == trained.fvu and "output" in report["fvu_of"]


def test_a_transcoders_features_start_on_distinct_tokens() -> None:
    """No two starting inputs closer than SEED_SIMILARITY (cosine, centred); where too few qualify (three
    clusters of near-copies, five features), one start per cluster and random rows for the rest."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(3_000, 16, generator=gen) + 5.0
    seeds = _seed_rows(rows, 100, torch.Generator().manual_seed(1), block=64)
    unit = rows[seeds] - rows.mean(0)
    unit /= unit.norm(dim=1, keepdim=True)
    similarity = unit @ unit.T - 2 * torch.eye(100)
    assert seeds.unique().numel() == 100 and similarity.max() <= SEED_SIMILARITY + 1e-6

    centres = torch.randn(3, 16, generator=gen) * 10
    clustered = centres.repeat_interleave(400, dim=0) + 0.01 * torch.randn(1_200, 16, generator=gen)
    seeds = _seed_rows(clustered, 5, torch.Generator().manual_seed(2))
    assert sorted((seeds[:3] // 400).tolist()) == [0, 1, 2] and len(seeds) == 5
