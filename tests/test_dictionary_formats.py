"""Gemma Scope and Llama Scope folders, and SAELens release ids, against SAELens's own converters.

Folders are synthetic (random arrays of the tiny model's width, laid out as the released ones are); SAELens reads
the same files through its own hub converters, their download pointed at the local files, and builds its SAE as
from_pretrained does. Our encode and decoder must equal SAELens's bit for bit. Then every way such a folder or
name is refused (one line, never a traceback, a download, an unpickling or a huge allocation), and a harvest of
both formats on a tiny LLaMA."""

from __future__ import annotations

import io
import json
import math
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from featureatlas.load import sae_releases
from featureatlas.load.dictionaries import Dictionary, DictionaryError, load_dictionaries

from helpers.tiny_models import HIDDEN, save_tiny_model, write_corpus

D_IN, D_SAE = HIDDEN, 48
GEMMA_REPO, GEMMA_ID = "gemma-scope-2b-pt-res", "layer_2/width_16k/average_l0_50"
LLAMA_RELEASE, LLAMA_ID, LLAMA_FOLDER = "llama_scope_lxr_8x", "l2r_8x", "Llama3_1-8B-Base-L2R-8x"
NORM_IN = 3.7  # dataset_average_activation_norm.in of the synthetic Llama Scope folders
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])


# ---- what SAELens does with the same files -------------------------------------------------------------------

def local_hub(monkeypatch: pytest.MonkeyPatch, local: Path, folder: str) -> None:
    """SAELens's converters download `folder`'s files of a repository: served from the local folder instead."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    def download(repo_id: str, filename: str, subfolder: str | None = None, **_: object) -> str:
        path = f"{subfolder}/{filename}" if subfolder else filename
        assert path.startswith(folder + "/"), path
        return str(local / path.removeprefix(folder + "/"))

    monkeypatch.setattr(loaders, "hf_hub_download", download)


def saelens_converter(monkeypatch: pytest.MonkeyPatch, loader: Callable, repo_id: str, folder: str, local: Path,
                      overrides: dict) -> torch.nn.Module:
    """SAELens's hub converter `loader` told to read repo_id's `folder`, served from `local`, and the SAE built
    from what it returns as SAE.from_pretrained builds it."""
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders as loaders

    local_hub(monkeypatch, local, folder)
    cfg, state, _ = loader(repo_id=repo_id, folder_name=folder, device="cpu", force_download=False,
                           cfg_overrides={"dtype": "float32", "device": "cpu", **overrides})
    sae = SAE.from_dict(loaders.handle_config_defaulting(cfg))
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state, assign=True)
    return sae


def inputs(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.2


def assert_as_saelens(d: Dictionary, sae: torch.nn.Module, x: torch.Tensor, saelens_x: torch.Tensor | None = None
                      ) -> None:
    """The same features bit for bit (some fire, some do not), and the same decoder."""
    with torch.inference_mode():
        ours, theirs = d.encode(x), sae.encode(x if saelens_x is None else saelens_x)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert 0 < (ours != 0).float().mean() < 1
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            assert torch.equal(d.tensors[name], getattr(sae, name)), name
        decoded = sae.decode(theirs)
        torch.testing.assert_close(ours @ d.decoder + d.tensors["b_dec"], decoded.flatten(-2) if decoded.shape[
            -1] != d.d_out else decoded, rtol=0, atol=0)


# ---- Gemma Scope ---------------------------------------------------------------------------------------------

def gemma_arrays(d_in: int = D_IN, d_sae: int = D_SAE, seed: int = 0, dtype: type = np.float32
                 ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W_enc": rng.normal(0, 0.4, (d_in, d_sae)).astype(dtype), "W_dec": rng.normal(0, 0.4, (d_sae, d_in)
                                                                                           ).astype(dtype),
            "b_enc": rng.normal(0, 0.3, d_sae).astype(dtype), "b_dec": rng.normal(0, 0.3, d_in).astype(dtype),
            "threshold": rng.uniform(0, 1.5, d_sae).astype(dtype)}


def gemma_folder(root: Path, repo: str = GEMMA_REPO, folder: str = GEMMA_ID, arrays: dict | None = None,
                 writer: Callable = np.savez) -> Path:
    path = root / repo / folder
    path.mkdir(parents=True, exist_ok=True)
    writer(path / "params.npz", **(gemma_arrays() if arrays is None else arrays))
    return path


def saelens_gemma(monkeypatch: pytest.MonkeyPatch, local: Path, repo: str = GEMMA_REPO, folder: str = GEMMA_ID
                  ) -> torch.nn.Module:
    """SAELens's gemma_2 (or gemma_2_transcoder) converter on the params.npz in `local`, as google/REPO's folder."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    transcoder = repo.endswith("transcoders")
    loader = loaders.gemma_2_transcoder_huggingface_loader if transcoder else loaders.gemma_2_sae_huggingface_loader
    return saelens_converter(monkeypatch, loader, f"google/{repo}", folder, local,  # sizes: not the 2B's
                             {"d_in": D_IN, "d_sae": D_SAE, **({"d_out": D_IN} if transcoder else {})})


@pytest.mark.parametrize(("repo", "hook", "hook_out"), [
    ("gemma-scope-2b-pt-res", "blocks.2.hook_resid_post", None),
    ("gemma-scope-9b-it-res-canonical", "blocks.2.hook_resid_post", None),
    ("gemma-scope-2b-pt-mlp", "blocks.2.hook_mlp_out", None),
    ("gemma-scope-2b-pt-transcoders", "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"),
])
def test_gemma_scope_folder_is_saelens_gemma_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo: str,
                                               hook: str, hook_out: str | None) -> None:
    (d,) = load_dictionaries(gemma_folder(tmp_path, repo))
    assert_as_saelens(d, saelens_gemma(monkeypatch, d.path, repo), inputs(3, 5, D_IN))
    assert (d.format, d.hook_name, d.hook_reads, d.hook_out_name, d.d_in, d.d_sae) == (
        "gemma_scope", hook, "hook", hook_out, D_IN, D_SAE)
    assert (d.kind, d.architecture) == (("transcoder", "jumprelu_transcoder") if hook_out else ("sae", "jumprelu"))
    assert (d.dtype, d.subtract_b_dec, d.config_file) == (torch.float32, False, d.path / "params.npz")
    assert d.config["model_name"] == ("gemma-2-9b-it" if "9b-it" in repo else "gemma-2-2b")
    relu = torch.relu(inputs(3, 5, D_IN) @ d.tensors["W_enc"] + d.tensors["b_enc"])  # the threshold really cuts
    assert (relu != 0).sum() > (d.encode(inputs(3, 5, D_IN)) != 0).sum()


def test_gemma_scope_attention_sae_takes_flattened_heads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (d,) = load_dictionaries(gemma_folder(tmp_path, "gemma-scope-2b-pt-att"))
    x = inputs(2, 6, D_IN)
    assert_as_saelens(d, saelens_gemma(monkeypatch, d.path, "gemma-scope-2b-pt-att"), x, x.unflatten(-1, (2, 16)))
    assert d.hook_name == "blocks.2.attn.hook_z"


@pytest.mark.parametrize("variant", ["lowercase w_ names", "float16", "float64", "compressed", "scaling factor 1"])
def test_gemma_scope_variants_numpy_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    arrays = gemma_arrays(dtype={"float16": np.float16, "float64": np.float64}.get(variant, np.float32))
    if variant == "lowercase w_ names":
        arrays = {name.replace("W_", "w_"): a for name, a in arrays.items()}
    if variant == "scaling factor 1":
        arrays["scaling_factor"] = np.ones(D_SAE, np.float32)
    folder = gemma_folder(tmp_path, arrays=arrays, writer=np.savez_compressed if variant == "compressed" else np.savez)
    (d,) = load_dictionaries(folder)
    assert_as_saelens(d, saelens_gemma(monkeypatch, folder), inputs(4, D_IN))
    assert "scaling_factor" not in d.tensors


def test_gemma_scope_hook_named_by_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the repository's layout the folder does not say its hook: PATH@HOOK names it."""
    folder = gemma_folder(tmp_path / "mine", repo="downloaded", folder="sae")
    with pytest.raises(DictionaryError, match=r"params.npz: .*does not say which hook.*PATH@blocks.L.hook_resid_post"):
        load_dictionaries(folder)
    (d,) = load_dictionaries(f"{folder}@blocks.1.hook_mlp_out")
    assert (d.hook_name, d.path, d.config["model_name"]) == ("blocks.1.hook_mlp_out", folder, None)
    (inside,) = load_dictionaries(f"{gemma_folder(tmp_path)}@blocks.2.hook_resid_pre")  # the user's hook wins
    assert inside.hook_name == "blocks.2.hook_resid_pre"
    assert_as_saelens(d, saelens_gemma(monkeypatch, folder), inputs(4, D_IN))


@pytest.mark.parametrize(("where", "suffix", "message"), [
    ("gemma-scope-2b-pt-res/layer_2/width_16k/average_l0_50", "@blocks.3.hook_resid_post",
     "is on layer 3, but the folder says layer_2"),
    ("gemma-scope-2b-pt-res/layer_2/width_16k/average_l0_50", "@resid", "not a TransformerLens hook name"),
    ("gemma-scope-2b-pt-res/layer_2/width_16k/average_l0_50", "@blocks.2.hook_resid_post\n", "not a Trans"),
    ("gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6", "", "hook_embed"),
    ("gemma-scope-2b-pt-res/embedding/width_4k/average_l0_6", "@blocks.0.hook_resid_pre", "hook_embed"),
    ("gemma-scope-2b-pt-transcoders/layer_2/width_16k/average_l0_50", "@blocks.2.hook_mlp_out",
     "transcoder reads blocks.L.ln2.hook_normalized"),
    ("gemma-scope-2b-pt-res/width_16k/average_l0_50", "", "does not say which hook"),
    ("gemma-scope-2b-pt-resx/layer_2/average_l0_50", "", "does not say which hook"),
])
def test_gemma_scope_hook_refusals(tmp_path: Path, where: str, suffix: str, message: str) -> None:
    repo, _, folder = where.partition("/")
    path = gemma_folder(tmp_path, repo, folder)
    with pytest.raises(DictionaryError, match=message) as e:
        load_dictionaries(f"{path}{suffix}")
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path / "params.npz"))


def test_hook_suffix_on_folders_that_name_their_hook(tmp_path: Path) -> None:
    llama = llama_folder(tmp_path)
    assert load_dictionaries(f"{llama}@blocks.2.hook_resid_post")[0].hook_name == "blocks.2.hook_resid_post"
    with pytest.raises(DictionaryError, match=r"hyperparams.json: names its hook, 'blocks.2.hook_resid_post', and "
                                              r"@'blocks.3.hook_resid_post' differs; drop @HOOK"):
        load_dictionaries(f"{llama}@blocks.3.hook_resid_post")
    with pytest.raises(DictionaryError, match="this is a folder of 1; pass one dictionary's folder"):
        load_dictionaries(f"{tmp_path}@blocks.2.hook_resid_post")
    with pytest.raises(DictionaryError, match="not a dictionary folder"):
        load_dictionaries(f"{tmp_path / 'missing'}@blocks.2.hook_resid_post")


def test_saelens_folder_with_hook_suffix(tmp_path: Path) -> None:
    from test_dictionaries import HOOK, saelens_folder

    folder = saelens_folder(tmp_path, "jumprelu")
    assert load_dictionaries(f"{folder}@{HOOK}")[0].hook_name == HOOK
    with pytest.raises(DictionaryError, match=r"cfg.json: names its hook"):
        load_dictionaries(f"{folder}@blocks.0.hook_resid_post")


# ---- Llama Scope ---------------------------------------------------------------------------------------------

def llama_hyperparams(layer: int = 2, **fields: object) -> dict:
    """The fields of a released hyperparams.json that SAELens or we read, and some that neither does."""
    hook = f"blocks.{layer}.hook_resid_post"
    return {"d_model": D_IN, "d_sae": D_SAE, "expansion_factor": D_SAE // D_IN, "hook_point_in": hook,
            "hook_point_out": hook, "act_fn": "jumprelu", "jump_relu_threshold": 0.45, "norm_activation":
            "dataset-wise", "dataset_average_activation_norm": {"in": NORM_IN, "out": NORM_IN}, "top_k": 50,
            "apply_decoder_bias_to_pre_encoder": False, "use_decoder_bias": True,
            "sparsity_include_decoder_norm": True, **fields}


def llama_tensors(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"encoder.weight": (D_SAE, D_IN), "encoder.bias": (D_SAE,), "decoder.weight": (D_IN, D_SAE),
              "decoder.bias": (D_IN,)}
    return {name: (torch.randn(shape, generator=g) * 0.3).to(dtype) for name, shape in shapes.items()}


def llama_folder(root: Path, name: str = LLAMA_FOLDER, hp: dict | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    folder = root / name
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "hyperparams.json").write_text(json.dumps(llama_hyperparams() if hp is None else hp))
    save_file(llama_tensors() if tensors is None else tensors, str(folder / "checkpoints" / "final.safetensors"))
    return folder


def saelens_llama(monkeypatch: pytest.MonkeyPatch, root: Path, fold: float = D_IN**0.5 / NORM_IN
                  ) -> torch.nn.Module:
    """SAELens's llama_scope converter, then the norm fold from_pretrained applies with the directory's factor."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    sae = saelens_converter(monkeypatch, loaders.llama_scope_sae_huggingface_loader, "fnlp/Llama3_1-8B-Base-LXR-8x",
                            LLAMA_FOLDER, root / LLAMA_FOLDER, {})
    sae.fold_activation_norm_scaling_factor(fold)
    return sae


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_llama_scope_folder_is_saelens_llama_scope(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   dtype: torch.dtype) -> None:
    (d,) = load_dictionaries(llama_folder(tmp_path, tensors=llama_tensors(dtype=dtype)))
    assert_as_saelens(d, saelens_llama(monkeypatch, tmp_path), inputs(3, 5, D_IN))
    assert (d.format, d.kind, d.architecture, d.hook_name, d.hook_reads, d.d_in, d.d_sae, d.dtype) == (
        "llama_scope", "sae", "jumprelu", "blocks.2.hook_resid_post", "hook", D_IN, D_SAE, torch.float32)
    s = D_IN**0.5 / NORM_IN  # written out: inputs scaled to norm sqrt(d) on average, folded into the weights
    t = {k: v.float() for k, v in llama_tensors(dtype=dtype).items()}
    assert torch.equal(d.tensors["threshold"], torch.full((D_SAE,), 0.45 * s))
    x = inputs(7, D_IN)
    pre = (x * s) @ t["encoder.weight"].T + t["encoder.bias"]
    torch.testing.assert_close(d.encode(x), pre * (pre > 0.45 * s), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.decoder, t["decoder.weight"].T / s)
    assert d.config_file == d.path / "hyperparams.json"


def test_llama_scope_repository_folder_reads_every_layer(tmp_path: Path) -> None:
    for layer in (10, 2, 1):
        llama_folder(tmp_path, f"Llama3_1-8B-Base-L{layer}R-8x", llama_hyperparams(layer))
    found = load_dictionaries(tmp_path)
    assert [d.hook_name for d in found] == [f"blocks.{n}.hook_resid_post" for n in (1, 2, 10)]


LLAMA_REFUSALS = [
    ({"act_fn": "topk"}, "act_fn is 'topk': SAELens reads every Llama Scope folder as a jumprelu"),
    ({"norm_activation": "token-wise"}, "norm_activation is 'token-wise'"),
    ({"sae_type": "crosscoder"}, "sae_type is 'crosscoder'"),
    ({"apply_decoder_bias_to_pre_encoder": True}, "apply_decoder_bias_to_pre_encoder is true"),
    ({"hook_point_out": "blocks.2.hook_mlp_out", "hook_point_in": "blocks.2.ln2.hook_normalized"},
     "a Llama Scope transcoder"),
    ({"hook_point_in": None}, "hook_point_in is None"),
    ({"jump_relu_threshold": float("nan")}, "jump_relu_threshold is nan, not a finite number"),
    ({"jump_relu_threshold": "0.4"}, "jump_relu_threshold is '0.4', not a finite number"),
    ({"jump_relu_threshold": True}, "jump_relu_threshold is True"),
    ({"jump_relu_threshold": 10**400}, "jump_relu_threshold is .*, not a finite number"),
    ({"dataset_average_activation_norm": 3.7}, "dataset_average_activation_norm.in is None"),
    ({"dataset_average_activation_norm": {"in": 0}}, "dataset_average_activation_norm.in is 0, not positive"),
    ({"d_model": 2**70}, "tensor encoder.weight has shape"),
    ({"d_sae": D_IN}, "d_sae gives 32 features, as many as d_in"),
    ({"d_model": "32"}, "d_model is '32', not a positive integer"),
]


@pytest.mark.parametrize(("fields", "message"), LLAMA_REFUSALS, ids=[m[:30] for _, m in LLAMA_REFUSALS])
def test_llama_scope_refusals(tmp_path: Path, fields: dict, message: str) -> None:
    folder = llama_folder(tmp_path, hp=llama_hyperparams(**fields))
    with pytest.raises(DictionaryError, match=message) as e:
        load_dictionaries(folder)
    assert "\n" not in str(e.value)


def test_llama_scope_weights_refusals(tmp_path: Path) -> None:
    folder = llama_folder(tmp_path, tensors=llama_tensors() | {"log_jumprelu_threshold": torch.zeros(D_SAE)})
    with pytest.raises(DictionaryError, match="unexpected tensor log_jumprelu_threshold"):
        load_dictionaries(folder)
    folder = llama_folder(tmp_path / "t", tensors=llama_tensors() | {"decoder.weight": torch.zeros(D_SAE, D_IN)})
    with pytest.raises(DictionaryError, match=r"tensor decoder.weight has shape \[48, 32\], expected \[32, 48\]"):
        load_dictionaries(folder)
    (folder / "checkpoints" / "final.safetensors").unlink()
    with pytest.raises(DictionaryError, match=r"hyperparams.json has no checkpoints/final.safetensors beside it"):
        load_dictionaries(folder)
    huge = llama_folder(tmp_path / "h")  # a header declaring 2**40 elements in a file of a few kilobytes
    raw = (huge / "checkpoints" / "final.safetensors").read_bytes()
    header = raw[8:8 + int.from_bytes(raw[:8], "little")].replace(b"[48,32]", b"[1099511627776,32]", 1)
    (huge / "checkpoints" / "final.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw[
        8 + int.from_bytes(raw[:8], "little"):])
    with pytest.raises(DictionaryError, match="not a readable safetensors file"):
        load_dictionaries(huge)


# ---- SAELens release ids and hub repositories ----------------------------------------------------------------

def fake_hub(monkeypatch: pytest.MonkeyPatch, repos: dict[str, Path]) -> list[tuple[str, str]]:
    """sae_releases' download served from local folders, one per repository; returns the files asked for."""
    asked: list[tuple[str, str]] = []

    def download(repo_id: str, filename: str) -> str:
        asked.append((repo_id, filename))
        return str(repos[repo_id] / filename)

    monkeypatch.setattr(sae_releases, "_download", download)
    return asked


def test_gemma_scope_release_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gemma_folder(tmp_path, "hub", "layer_12/width_16k/average_l0_82")
    asked = fake_hub(monkeypatch, {"google/gemma-scope-2b-pt-res": tmp_path / "hub"})
    (d,) = load_dictionaries(f"{GEMMA_REPO}/layer_12/width_16k/average_l0_82")
    assert asked == [("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82/params.npz")]
    assert (d.hook_name, d.format, d.config["model_name"]) == ("blocks.12.hook_resid_post", "gemma_scope",
                                                              "gemma-2-2b")
    assert_as_saelens(d, saelens_gemma(monkeypatch, d.path, folder="layer_12/width_16k/average_l0_82"),
                      inputs(4, D_IN))
    (by_repo,) = load_dictionaries("google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82")  # the hub repo
    assert torch.equal(by_repo.encode(inputs(4, D_IN)), d.encode(inputs(4, D_IN)))


def test_gemma_scope_transcoder_release_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gemma_folder(tmp_path, "hub", "layer_0/width_16k/average_l0_76")
    fake_hub(monkeypatch, {"google/gemma-scope-2b-pt-transcoders": tmp_path / "hub"})
    (d,) = load_dictionaries("gemma-scope-2b-pt-transcoders/layer_0/width_16k/average_l0_76")
    assert (d.kind, d.hook_name, d.hook_out_name) == ("transcoder", "blocks.0.ln2.hook_normalized",
                                                      "blocks.0.hook_mlp_out")


def test_llama_scope_release_id_is_saelens_from_pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The release's norm_scaling_factor from SAELens's directory is what gets folded, as from_pretrained does."""
    from sae_lens import SAE

    llama_folder(tmp_path)
    asked = fake_hub(monkeypatch, {"fnlp/Llama3_1-8B-Base-LXR-8x": tmp_path})
    (d,) = load_dictionaries(f"{LLAMA_RELEASE}/{LLAMA_ID}")
    assert asked == [("fnlp/Llama3_1-8B-Base-LXR-8x", f"{LLAMA_FOLDER}/hyperparams.json"),
                     ("fnlp/Llama3_1-8B-Base-LXR-8x", f"{LLAMA_FOLDER}/checkpoints/final.safetensors")]
    local_hub(monkeypatch, tmp_path / LLAMA_FOLDER, LLAMA_FOLDER)
    sae = SAE.from_pretrained(LLAMA_RELEASE, LLAMA_ID, device="cpu")
    assert_as_saelens(d, sae, inputs(3, 4, D_IN))
    assert not torch.equal(d.tensors["W_enc"], load_dictionaries(tmp_path / LLAMA_FOLDER)[0].tensors["W_enc"])


def test_saelens_release_id_applies_its_config_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gpt2-small-res-jb's directory entry sets center_writing_weights, which no transformers model reproduces."""
    from test_dictionaries import PRE6, PRE6_SHAPES, random_tensors, write_folder

    write_folder(tmp_path / "blocks.0.hook_resid_pre", PRE6 | {"hook_name": "blocks.0.hook_resid_pre"},
                 random_tensors(PRE6_SHAPES), "sae_weights.safetensors")
    fake_hub(monkeypatch, {"jbloom/GPT2-Small-SAEs-Reformatted": tmp_path})
    with pytest.raises(DictionaryError, match="model_from_pretrained_kwargs.center_writing_weights is true"):
        load_dictionaries("gpt2-small-res-jb/blocks.0.hook_resid_pre")
    fake_hub(monkeypatch, {"someone/saes": tmp_path})  # a repository the directory does not know: its cfg.json alone
    (d,) = load_dictionaries("someone/saes/blocks.0.hook_resid_pre")
    assert (d.format, d.hook_name, d.dtype) == ("saelens", "blocks.0.hook_resid_pre", torch.float32)


def test_release_directory_read_as_saelens_reads_it() -> None:
    from sae_lens.loading.pretrained_saes_directory import (
        get_config_overrides,
        get_norm_scaling_factor,
        get_repo_id_and_folder_name,
    )

    for release, sae_id in ((GEMMA_REPO, "layer_12/width_16k/average_l0_82"), (LLAMA_RELEASE, LLAMA_ID),
                            ("gpt2-small-res-jb", "blocks.3.hook_resid_pre"),
                            ("gemma-scope-2b-pt-transcoders", "layer_0/width_16k/average_l0_76")):
        found = sae_releases.find(f"{release}/{sae_id}")
        assert (found.repo_id, found.folder) == get_repo_id_and_folder_name(release, sae_id)
        assert found.norm_scaling_factor == get_norm_scaling_factor(release, sae_id)
        assert found.overrides == get_config_overrides(release, sae_id)


@pytest.mark.parametrize(("name", "message"), [
    ("gemma-scope-2b-pt-res/layer_99/width_16k/x", "release gemma-scope-2b-pt-res has no id 'layer_99/width_16k/x'"),
    ("gemma-scope-2-4b-pt-transcoders-all/x", "its 'gemma_3' converter, which featureatlas does not reproduce"),
    ("nothing/here", "neither a release of sae-lens's directory nor a hub repository's folder"),
])
def test_release_refusals(name: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sae_releases, "_download", lambda *a: pytest.fail("no download for a refused name"))
    with pytest.raises(DictionaryError, match=message) as e:
        load_dictionaries(name)
    assert str(e.value).startswith(f"{name}: ") and "\n" not in str(e.value)


def test_release_id_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub in offline mode, with an empty cache: nothing leaves the machine, one line comes back."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    name = f"{GEMMA_REPO}/layer_12/width_16k/average_l0_82"
    with pytest.raises(DictionaryError) as e:
        load_dictionaries(name)
    message = str(e.value)
    assert message.startswith(f"{name}: cannot download params.npz from google/gemma-scope-2b-pt-res (offline?")
    assert message.endswith("download the folder and pass its path") and "\n" not in message

    def unreachable(repo_id: str, filename: str) -> str:
        raise ConnectionError("Failed to resolve 'huggingface.co'\nretrying")

    monkeypatch.setattr(sae_releases, "_download", unreachable)
    with pytest.raises(DictionaryError, match=r"cannot download hyperparams.json .*\(offline\? Failed to resolve "
                                              r"'huggingface.co'\); download the folder and pass its path$"):
        load_dictionaries(f"{LLAMA_RELEASE}/{LLAMA_ID}")


def test_release_id_without_sae_lens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sae_releases.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DictionaryError, match=r"needs sae-lens installed \(pip install sae-lens\); or download the "
                                              r"folder and pass its path"):
        load_dictionaries(f"{GEMMA_REPO}/layer_12/width_16k/average_l0_82")


def test_missing_local_paths_are_not_release_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sae_releases, "find", lambda name: pytest.fail(f"{name} looked up as a release"))
    for name in (str(tmp_path / "a" / "b"), "./a/b", "../a/b", "~/a/b", "a\\b\\c", "C:/a/b", "single"):
        with pytest.raises(DictionaryError, match="not a dictionary folder"):
            load_dictionaries(name)


# ---- untrusted params.npz ------------------------------------------------------------------------------------

def npz_bytes(arrays: dict[str, np.ndarray] | None = None, compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **(gemma_arrays(8, 12) if arrays is None else arrays))
    return buffer.getvalue()


def npz_members(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def forged_npy(shape: tuple[int, ...], descr: str = "<f4", data: bytes = b"\0" * 64) -> bytes:
    """An .npy whose header declares any shape, followed by a few bytes."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


class Exploit:
    """Unpickling it would leave a file behind."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "unpickled"))


def good_members() -> dict[str, bytes]:
    return {f"{name}.npy": npy(array) for name, array in gemma_arrays(8, 12).items()}


def hostile_files(marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (params.npz bytes, what the one line says)."""
    good = npz_bytes()
    pickled = np.empty(12, dtype=object)
    pickled[:] = [Exploit(marker)] * 12
    bomb = npz_members(good_members() | {"threshold.npy": forged_npy((2**24,), data=b"\0" * 2**26)},
                       zipfile.ZIP_DEFLATED)
    return {
        "empty": (b"", "not a readable .npz"),
        "text": (b"W_enc = [1, 2]", "not a readable .npz"),
        "plain npy": (npy(np.zeros((8, 12), np.float32)), "not a readable .npz"),
        "truncated": (good[: len(good) // 2], "not a readable .npz"),
        "truncated end": (good[:-30], "not a readable .npz"),
        "bad crc": (good[:200] + bytes([good[200] ^ 0xFF]) + good[201:], "not a readable .npz"),
        "pickled objects": (npz_members(good_members() | {"threshold.npy": npy(pickled)}),
                            "array threshold is '|O', not a native float array"),
        "int array": (npz_members(good_members() | {"b_enc.npy": npy(np.arange(12))}), "array b_enc is '<i8'"),
        "big-endian": (npz_members(good_members() | {"b_enc.npy": npy(np.zeros(12, ">f4"))}), "array b_enc is '>f4'"),
        "complex": (npz_members(good_members() | {"b_enc.npy": npy(np.zeros(12, np.complex64))}), "array b_enc is"),
        "structured": (npz_members(good_members() | {"b_enc.npy": npy(np.zeros(12, "f4,f4"))}), "array b_enc is"),
        "huge shape": (npz_members(good_members() | {"W_enc.npy": forged_npy((2**20, 2**20))}),
                       r"array W_enc declares shape \[1048576, 1048576\] of float32, which does not fit its 64 bytes"),
        "huge 1-d": (npz_members(good_members() | {"threshold.npy": forged_npy((2**62,), "<f8")}), "does not fit"),
        "negative shape": (npz_members(good_members() | {"b_dec.npy": forged_npy((-8,))}), "b_dec"),
        "zip bomb": (bomb, "unpack to .* bytes from .*; not a params.npz"),
        "transposed W_dec": (npz_bytes(gemma_arrays(8, 12) | {"W_dec": np.zeros((8, 12), np.float32)}),
                             r"array W_dec has shape \[8, 12\], expected \[12, 8\] from W_enc"),
        "short threshold": (npz_bytes(gemma_arrays(8, 12) | {"threshold": np.zeros(11, np.float32)}),
                            r"array threshold has shape \[11\], expected \[12\]"),
        "1-d W_enc": (npz_bytes(gemma_arrays(8, 12) | {"W_enc": np.zeros(96, np.float32)}),
                      r"array W_enc has shape \[96\], expected \[d_in, d_sae\]"),
        "empty W_enc": (npz_bytes(gemma_arrays(0, 12)), r"array W_enc has shape \[0, 12\]"),
        "square": (npz_bytes(gemma_arrays(12, 12)), "W_enc gives 12 features, as many as d_in"),
        "missing threshold": (npz_bytes({k: v for k, v in gemma_arrays(8, 12).items() if k != "threshold"}),
                              "array threshold missing"),
        "extra array": (npz_bytes(gemma_arrays(8, 12) | {"log_threshold": np.zeros(12, np.float32)}),
                        "unexpected array 'log_threshold'"),
        "not an array": (npz_members(good_members() | {"README.txt": b"hello"}), "member 'README.txt' is not an"),
        "nested member": (npz_members(good_members() | {"x/W_enc.npy": npy(np.zeros(2))}), "member 'x/W_enc.npy'"),
        "both spellings": (npz_members(good_members() | {"w_enc.npy": npy(np.zeros((8, 12), np.float32))}),
                           "array W_enc twice"),
        "duplicate member": (duplicate_member(), "member 'b_enc.npy' twice"),
        "many members": (npz_members({f"m{i}.npy": b"" for i in range(17)}), "17 members"),
        "scaling factor": (npz_bytes(gemma_arrays(8, 12) | {"scaling_factor": np.full(12, 2, np.float32)}),
                           "scaling_factor is not all ones"),
        "npy version 3": (npz_members(good_members() | {"b_enc.npy": b"\x93NUMPY\x03\x00" + b"\0" * 60}),
                          r"array b_enc: .npy version \(3, 0\)|not a readable"),
        "bad header": (npz_members(good_members() | {"b_enc.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': __import"}),
                       "not a readable .npz"),
    }


def duplicate_member() -> bytes:
    """b_enc.npy twice: numpy would read the second, a check of the first would be worthless."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name
        for name, data in [*good_members().items(), ("b_enc.npy", npy(np.zeros(12, np.float32)))]:
            archive.writestr(name, data)
    return buffer.getvalue()


def test_hostile_params_npz_get_one_line_each(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    for case, (data, message) in hostile_files(marker).items():
        folder = tmp_path / case / GEMMA_REPO / "layer_1"
        folder.mkdir(parents=True)
        (folder / "params.npz").write_bytes(data)
        with pytest.raises(DictionaryError, match=message) as e:
            load_dictionaries(folder)
        text = str(e.value)
        assert text.startswith(str(folder / "params.npz")) and "\n" not in text and len(text) < 600, (case, text)
    assert not marker.exists()


def test_hostile_npz_is_refused_before_any_big_allocation(tmp_path: Path) -> None:
    """A header declaring 2**40 floats is refused from its header: nothing near that size is ever allocated."""
    import tracemalloc

    folder = tmp_path / GEMMA_REPO / "layer_1"
    folder.mkdir(parents=True)
    (folder / "params.npz").write_bytes(npz_members(good_members() | {"W_enc.npy": forged_npy((2**20, 2**20))}))
    tracemalloc.start()
    try:
        with pytest.raises(DictionaryError):
            load_dictionaries(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**26


@FUZZ
@given(cut=st.integers(0, 4000) | st.none(), flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)),
                                                             max_size=6),
       compressed=st.booleans())
def test_fuzzed_params_npz(cut: int | None, flips: list[tuple[int, int]], compressed: bool) -> None:
    data = bytearray(npz_bytes(compressed=compressed))
    for at, bits in flips:
        data[at % len(data)] ^= bits
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name) / GEMMA_REPO / "layer_1"
        folder.mkdir(parents=True)
        (folder / "params.npz").write_bytes(bytes(data[:cut]))
        one_line_or_nothing(lambda: load_dictionaries(folder))


LLAMA_KEYS = ["d_model", "d_sae", "hook_point_in", "hook_point_out", "act_fn", "jump_relu_threshold",
              "norm_activation", "dataset_average_activation_norm", "in", "apply_decoder_bias_to_pre_encoder",
              "sae_type"]
LLAMA_VALUES = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
                | st.sampled_from([D_IN, D_SAE, "jumprelu", "dataset-wise", "blocks.2.hook_resid_post", "9" * 5000,
                                   10**400, "sae"]))


@FUZZ
@given(hp=st.dictionaries(st.sampled_from(LLAMA_KEYS), st.recursive(
    LLAMA_VALUES, lambda inner: st.dictionaries(st.sampled_from(LLAMA_KEYS), inner, max_size=3)
    | st.lists(inner, max_size=3), max_leaves=8), max_size=10), base=st.booleans())
def test_fuzzed_llama_scope_hyperparams(hp: dict, base: bool) -> None:
    with tempfile.TemporaryDirectory() as name:
        folder = llama_folder(Path(name), hp=(llama_hyperparams() | hp) if base else hp)
        one_line_or_nothing(lambda: load_dictionaries(folder))


def one_line_or_nothing(action: Callable[[], object]) -> None:
    try:
        action()
    except DictionaryError as e:
        assert str(e) and "\n" not in str(e) and len(str(e)) < 1000, str(e)[:300]


# ---- a harvest of both formats --------------------------------------------------------------------------------

def test_harvest_reads_gemma_and_llama_scope_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a tiny LLaMA: a Gemma Scope folder named with @HOOK and a Llama Scope folder, each feature's firing
    count and maximum those of SAELens's encode of the brute-force residual stream."""
    from test_features import CONTEXT_LENGTH, run_contexts_alone

    from featureatlas.harvest.run import HarvestConfig, harvest

    model_dir = save_tiny_model("llama", tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus")
    gemma = gemma_folder(tmp_path / "g", "downloaded", "sae", gemma_arrays(seed=4))
    llama_folder(tmp_path / "l")
    store = tmp_path / "store.duckdb"
    harvest(HarvestConfig(model=str(model_dir), corpus=corpus, out=store, context_length=CONTEXT_LENGTH, top_k=3,
                          batch_size=4, dtype="float32", device="cpu", progress=False, layers="none", seed=1,
                          saes=[f"gs={gemma}@blocks.1.hook_resid_post", str(tmp_path / "l" / LLAMA_FOLDER)]))
    references = {("sae:gs", 1): saelens_gemma(monkeypatch, gemma),
                  (f"sae:{LLAMA_FOLDER}", 2): saelens_llama(monkeypatch, tmp_path / "l")}
    _, acts = run_contexts_alone(model_dir, corpus)
    con = duckdb.connect(str(store), read_only=True)
    assert con.execute("SELECT source, layer, hook_name, dictionary_format FROM sources ORDER BY layer").fetchall() \
        == [("sae:gs", 1, "blocks.1.hook_resid_post", "gemma_scope"),
            (f"sae:{LLAMA_FOLDER}", 2, "blocks.2.hook_resid_post", "llama_scope")]
    for (source, layer), sae in references.items():
        with torch.inference_mode():
            features = [sae.encode(torch.from_numpy(a[layer]))[1:].numpy() for a in acts["resid"]]  # BOS left out
        stored = con.execute("SELECT unit, n_firing, max_activation FROM statistics WHERE source = ? ORDER BY unit",
                             [source]).fetchall()
        assert [n for _, n, _ in stored] == [sum(int((f[:, u] > 0).sum()) for f in features) for u in range(D_SAE)]
        assert 0 < sum(n for _, n, _ in stored) < sum(f.size for f in features)
        for unit, n, top in stored:
            if n:
                assert math.isclose(top, max(float(f[:, unit].max()) for f in features), rel_tol=1e-4), (source, unit)
    # Reopened from the store alone (verify, probe, serve): the Gemma Scope folder's hook comes from the store
    con.close()
    from featureatlas.harvest.config import VerifyConfig
    from featureatlas.harvest.reopen import dictionary_specs
    from featureatlas.harvest.verify import verify

    with duckdb.connect(str(store), read_only=True) as con:
        specs = dictionary_specs(con, con.execute("SELECT model FROM runs").fetchone()[0], [])
    assert f"gs={gemma}@blocks.1.hook_resid_post" in specs and not any("@" in s for s in specs if "gs=" not in s)
    report = verify(VerifyConfig(store=store, sample=30, device="cpu", progress=False))
    assert report.mismatches == [] and report.n_examples > 0
