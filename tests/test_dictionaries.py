"""The dictionary loader against the formats' own encodes: SAELens dictionaries are built, saved and loaded back
by SAELens itself; sparsify's encode is written out here. Then one test per folder the loader must refuse."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from featureatlas.load.dictionaries import Dictionary, DictionaryError, load_dictionaries

D_IN, D_SAE, D_OUT = 16, 48, 20
HOOK, HOOK_OUT = "blocks.3.hook_resid_mid", "blocks.3.hook_mlp_out"


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial biases and positive thresholds, so that some features fire and some are cut."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            thresholds = name == "threshold"
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 if thresholds else torch.randn(p.shape, generator=g) * 0.3)


def saelens_folder(tmp_path: Path, architecture: str = "standard", name: str = "sae", **fields: object) -> Path:
    transcoder = "transcoder" in architecture
    metadata = {"hook_name": HOOK, "model_name": "tiny", **({"hook_name_out": HOOK_OUT} if transcoder else {}),
                **fields.pop("metadata", {})}
    cfg = {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           **({"d_out": D_OUT, "apply_b_dec_to_input": False} if transcoder else {}), **fields, "metadata": metadata}
    from sae_lens import SAE  # imported where used: importing sae_lens takes seconds, paid by every test worker

    sae = SAE.from_dict(cfg)
    randomise(sae)
    sae.save_model(tmp_path / name)
    return tmp_path / name


def inputs(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.2


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # the same ops in the same order: bit for bit
    assert torch.equal(ours != 0, theirs != 0)
    assert 0 < (ours != 0).float().mean() < 1


def assert_as_saelens(folder: Path, x: torch.Tensor, saelens_x: torch.Tensor | None = None) -> Dictionary:
    from sae_lens import SAE

    (d,) = load_dictionaries(folder)
    reference = SAE.load_from_disk(folder)
    with torch.inference_mode():
        assert_same(d.encode(x), reference.encode(x if saelens_x is None else saelens_x))
    return d


SAELENS_CASES = [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("standard", {"normalize_activations": "constant_norm_rescale"}),
    ("standard", {"normalize_activations": "layer_norm", "apply_b_dec_to_input": False}),
    ("standard", {"dtype": "bfloat16"}),
    ("jumprelu", {}),
    ("jumprelu", {"apply_b_dec_to_input": False, "normalize_activations": "layer_norm", "dtype": "float64"}),
    ("topk", {"k": 5}),
    ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True, "normalize_activations": "constant_norm_rescale"}),
    ("abstopk", {"k": 5, "apply_b_dec_to_input": False}),
    ("gated", {}),
    ("gated", {"apply_b_dec_to_input": False, "normalize_activations": "layer_norm"}),
    ("transcoder", {}),
    ("transcoder", {"normalize_activations": "constant_norm_rescale"}),
    ("skip_transcoder", {}),
    ("jumprelu_transcoder", {"normalize_activations": "layer_norm"}),
    ("jumprelu_skip_transcoder", {}),
]


@pytest.mark.parametrize(("architecture", "fields"), SAELENS_CASES,
                         ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in f.items())}" for a, f in SAELENS_CASES])
def test_saelens_encode_is_saelens_encode(tmp_path: Path, architecture: str, fields: dict) -> None:
    d = assert_as_saelens(saelens_folder(tmp_path, architecture, **fields), inputs(3, 5, D_IN))
    transcoder = "transcoder" in architecture
    assert (d.format, d.architecture, d.kind, d.hook_name, d.hook_reads) == (
        "saelens", architecture, "transcoder" if transcoder else "sae", HOOK, "hook")
    assert d.hook_out_name == (HOOK_OUT if transcoder else None)
    assert (d.d_in, d.d_sae, d.d_out) == (D_IN, D_SAE, D_OUT if transcoder else D_IN)
    assert d.decoder.shape == (D_SAE, d.d_out) and d.decoder.dtype == d.dtype
    assert d.dtype == getattr(torch, fields.get("dtype", "float32"))
    assert d.config["architecture"] == architecture
    if d.activation in ("jumprelu", "topk"):  # the threshold or the top-k really cuts features ReLU would keep
        x = inputs(3, 5, D_IN)
        relu = dataclasses.replace(d, activation="relu", rescale_acts_by_decoder_norm=False).encode(x)
        assert (relu != 0).sum() > (d.encode(x) != 0).sum()


def test_saelens_folded_checkpoint(tmp_path: Path) -> None:
    """A checkpoint whose activation_scaler.json holds no factor any more: the scaling is in the weights."""
    folder = saelens_folder(tmp_path, normalize_activations="expected_average_only_in")
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None, "has_whitening": False}))
    d = assert_as_saelens(folder, inputs(3, D_IN))
    assert d.normalize == "none" and d.to(torch.device("cpu")) is d


def test_saelens_hook_z_takes_flattened_heads(tmp_path: Path) -> None:
    folder = saelens_folder(tmp_path, reshape_activations="hook_z", metadata={"hook_name": "blocks.1.attn.hook_z"})
    x = inputs(2, 6, D_IN)
    d = assert_as_saelens(folder, x, saelens_x=x.unflatten(-1, (4, 4)))  # TransformerLens gives [..., heads, d_head]
    assert d.hook_name == "blocks.1.attn.hook_z"


def test_saelens_huggingface_module_hook(tmp_path: Path) -> None:
    metadata = {"hook_name": "model.layers.3", "model_class_name": "AutoModelForCausalLM"}
    folder = saelens_folder(tmp_path, metadata=metadata)
    d = assert_as_saelens(folder, inputs(4, D_IN))
    assert (d.hook_name, d.hook_reads) == ("model.layers.3", "output")


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka_batchtopk"])
def test_saelens_batchtopk_is_saved_as_jumprelu(tmp_path: Path, architecture: str) -> None:
    from sae_lens import TrainingSAE

    sae = TrainingSAE.from_dict({"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "k": 4.0,
                                 "dtype": "float32", "device": "cpu", "metadata": {"hook_name": HOOK},
                                 **({"matryoshka_widths": [16, D_SAE]} if "matryoshka" in architecture else {})})
    randomise(sae)
    sae.topk_threshold.fill_(0.4)
    sae.save_inference_model(tmp_path / "sae")
    assert assert_as_saelens(tmp_path / "sae", inputs(3, 5, D_IN)).architecture == "jumprelu"


def write_folder(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor], weights: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / weights))
    return folder


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * 0.3 for name, shape in shapes.items()}


PRE6 = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "hook_name": HOOK, "hook_layer": 3,
        "hook_head_index": None, "activation_fn_str": "relu", "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False, "normalize_activations": "none", "model_name": "gpt2",
        "context_size": 128, "sae_lens_version": "4.4.0"}
PRE6_SHAPES = {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}


def pre6_folder(tmp_path: Path, **fields: object) -> Path:
    tensors = random_tensors(PRE6_SHAPES) | {"scaling_factor": torch.ones(D_SAE)}  # old files carry ones here
    return write_folder(tmp_path / "pre6", PRE6 | fields, tensors, "sae_weights.safetensors")


def test_pre6_relu(tmp_path: Path) -> None:
    folder = pre6_folder(tmp_path)
    d = assert_as_saelens(folder, inputs(5, D_IN))
    t = load_file(str(folder / "sae_weights.safetensors"))
    x = inputs(5, D_IN)
    assert_same(d.encode(x), torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]))
    assert (d.architecture, d.hook_name, d.hook_reads) == ("standard", HOOK, "hook")


def test_pre6_topk(tmp_path: Path) -> None:
    d = assert_as_saelens(pre6_folder(tmp_path, activation_fn_str="topk", activation_fn_kwargs={"k": 6}),
                          inputs(4, 3, D_IN))
    assert (d.architecture, d.k) == ("topk", 6)
    assert ((d.encode(inputs(4, 3, D_IN)) != 0).sum(-1) <= 6).all()


def test_oldest_flat_config_keys(tmp_path: Path) -> None:
    cfg = {k: v for k, v in PRE6.items() if k not in ("hook_name", "hook_layer", "activation_fn_str",
                                                       "sae_lens_version", "normalize_activations")}
    folder = write_folder(
        tmp_path / "old", cfg | {"hook_point": "blocks.2.hook_resid_pre", "hook_point_layer": 2,
                                 "activation_fn": "relu", "normalize_activations": False},
        random_tensors(PRE6_SHAPES), "sae_weights.safetensors")
    d = assert_as_saelens(folder, inputs(5, D_IN))
    assert (d.hook_name, d.architecture) == ("blocks.2.hook_resid_pre", "standard")


SPARSIFY_CFG = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE,
                "k": 6, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}


def sparsify_folder(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **fields: object) -> Path:
    cfg = SPARSIFY_CFG | fields
    n, d_in = cfg["num_latents"], cfg["d_in"]
    shapes = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    tensors = random_tensors(shapes | ({"W_skip": (d_in, d_in)} if cfg["skip_connection"] else {}), seed)
    return write_folder(folder, cfg, {k: v.to(dtype) for k, v in tensors.items()}, "sae.safetensors")


def sparsify_reference(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """sparsify's SparseCoder.encode (fused_encoder's forward), its top-k scattered into a dense tensor."""
    cfg, t = json.loads((folder / "cfg.json").read_text()), load_file(str(folder / "sae.safetensors"))
    x = x.to(t["encoder.weight"].dtype)
    pre = F.relu(F.linear(x if cfg["transcode"] else x - t["b_dec"], t["encoder.weight"], t["encoder.bias"]))
    if cfg["activation"] == "topk":
        values, indices = torch.topk(pre, cfg["k"], dim=-1, sorted=False)
    else:
        values, indices = pre.unflatten(-1, (cfg["k"], -1)).max(dim=-1)
        indices = indices + torch.arange(0, pre.shape[-1], pre.shape[-1] // cfg["k"])
    return torch.zeros_like(pre).scatter(-1, indices, values)


def test_sparsify_run_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sparsify_folder(run / "layers.10", seed=1)
    sparsify_folder(run / "layers.2.mlp", seed=2, transcode=True, skip_connection=True)
    (run / "config.json").write_text(json.dumps({"sae": SPARSIFY_CFG, "hookpoints": ["layers.2.mlp", "layers.10"]}))
    (run / "logs").mkdir()
    dicts = load_dictionaries(run)
    assert [(d.hook_name, d.kind, d.architecture, d.hook_reads, d.hook_out_name) for d in dicts] == [
        ("layers.2.mlp", "transcoder", "topk_skip_transcoder", "input", "layers.2.mlp"),
        ("layers.10", "sae", "topk", "output", None)]
    x = inputs(3, 4, D_IN)
    for d in dicts:
        assert (d.format, d.d_in, d.d_sae, d.d_out, d.dtype, d.k) == ("sparsify", D_IN, D_SAE, D_IN, torch.float32, 6)
        assert torch.equal(d.decoder, load_file(str(d.path / "sae.safetensors"))["W_dec"])
        with torch.inference_mode():
            assert_same(d.encode(x), sparsify_reference(d.path, x))


@pytest.mark.parametrize("activation", ["topk", "groupmax"])
def test_sparsify_hookpoint_folder_in_bfloat16(tmp_path: Path, activation: str) -> None:
    folder = sparsify_folder(tmp_path / "layers.5", dtype=torch.bfloat16, activation=activation)
    (d,) = load_dictionaries(folder)
    x = inputs(7, D_IN)
    assert (d.dtype, d.architecture) == (torch.bfloat16, activation)
    assert_same(d.encode(x), sparsify_reference(folder, x))


# Refusals: each builds a folder, returns (what to load, the file the message must name, the field it must name).
def edit_json(file: Path, metadata: dict | None = None, drop: tuple[str, ...] = (), **changes: object) -> None:
    cfg = json.loads(file.read_text()) | changes
    cfg.get("metadata", {}).update(metadata or {})
    file.write_text(json.dumps({k: v for k, v in cfg.items() if k not in drop}))


def edit_tensors(file: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


def saelens_edit(base: str = "standard", metadata: dict | None = None, **changes: object):
    def build(tmp: Path) -> Path:
        folder = saelens_folder(tmp, base, **({"k": 5} if "topk" in base else {}))
        edit_json(folder / "cfg.json", metadata, **changes)
        return folder
    return build


def weights_edit(change: Callable[[dict[str, torch.Tensor]], object]):
    def build(tmp: Path) -> Path:
        folder = saelens_folder(tmp)
        edit_tensors(folder / "sae_weights.safetensors", change)
        return folder
    return build


def with_scaler(state: dict, whitening: bool = False):
    def build(tmp: Path) -> Path:
        folder = saelens_edit(normalize_activations="expected_average_only_in")(tmp)
        (folder / "activation_scaler.json").write_text(json.dumps(state))
        if whitening:
            save_file({"mean": torch.zeros(D_IN)}, str(folder / "activation_whitening.safetensors"))
        return folder
    return build


def sparsify_edit(name: str = "layers.4", **fields: object):
    return lambda tmp: sparsify_folder(tmp / name, **fields)


def old_sparsify_transcoder(tmp: Path) -> Path:
    (tmp / "config.json").write_text(json.dumps({"sae": {"k": 6}, "transcode": True}))
    folder = sparsify_folder(tmp / "layers.1.mlp")
    edit_json(folder / "cfg.json", drop=("transcode",))
    return folder


def sparsify_transposed(tmp: Path) -> Path:
    folder = sparsify_folder(tmp / "layers.4")
    edit_tensors(folder / "sae.safetensors", lambda t: t.update({"encoder.weight": t["encoder.weight"].T.contiguous()}))
    return folder


def unlink(build: Callable[[Path], Path], name: str) -> Callable[[Path], Path]:
    def run(tmp: Path) -> Path:
        folder = build(tmp)
        (folder / name).unlink()
        return folder
    return run


def write_text(build: Callable[[Path], Path], text: str) -> Callable[[Path], Path]:
    def run(tmp: Path) -> Path:
        folder = build(tmp)
        (folder / "cfg.json").write_text(text)
        return folder
    return run


CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
REFUSALS = {
    "unknown-architecture": (saelens_edit(architecture="temporal"), CFG, "architecture"),
    "training-checkpoint": (saelens_edit(architecture="batchtopk"), CFG, "architecture"),
    "hook-head-index": (saelens_edit(metadata={"hook_head_index": 2}), CFG, "metadata.hook_head_index"),
    "no-hook-name": (saelens_edit(metadata={"hook_name": None}), CFG, "metadata.hook_name"),
    **{f"transformerlens-{flag}": (saelens_edit(metadata={"model_from_pretrained_kwargs": {flag: True}}), CFG,
                                   f"model_from_pretrained_kwargs.{flag}")
       for flag in ("fold_ln", "center_writing_weights", "fold_value_biases", "refactor_factored_attn_matrices")},
    "model-class": (saelens_edit(metadata={"model_class_name": "HookedMamba"}), CFG, "model_class_name"),
    "unknown-dtype": (saelens_edit(dtype="int8"), CFG, "dtype"),
    "invalid-json": (write_text(saelens_folder, '{"d_in": 16,'), CFG, "JSON"),
    "missing-weights": (unlink(saelens_folder, WEIGHTS), "", WEIGHTS),
    "missing-tensor": (weights_edit(lambda t: t.pop("b_enc")), WEIGHTS, "b_enc"),
    "extra-tensor": (weights_edit(lambda t: t.update(log_threshold=torch.zeros(D_SAE))), WEIGHTS, "log_threshold"),
    "mis-shaped-tensor": (weights_edit(lambda t: t.update(W_enc=t["W_enc"].T.contiguous())), WEIGHTS, "W_enc"),
    "scaling-factor": (weights_edit(lambda t: t.update(scaling_factor=torch.full((D_SAE,), 2.0))), WEIGHTS,
                       "scaling_factor"),
    "unknown-normalize": (saelens_edit(normalize_activations="whiten"), CFG, "normalize_activations"),
    "unfolded-normalize": (saelens_edit(normalize_activations="covariance_whitening"), CFG, "normalize_activations"),
    "unfolded-scaling-factor": (with_scaler({"scaling_factor": 0.25, "has_whitening": False}),
                                "activation_scaler.json", "scaling_factor"),
    "unfolded-whitening": (with_scaler({"scaling_factor": None, "has_whitening": True}, whitening=True),
                           "activation_scaler.json", "has_whitening"),
    "hook-z-on-resid": (saelens_edit(reshape_activations="hook_z"), CFG, "reshape_activations"),
    "topk-k": (saelens_edit("topk", k=D_SAE + 1), CFG, "k"),
    "transcoder-b-dec": (saelens_edit("transcoder", apply_b_dec_to_input=True), CFG, "apply_b_dec_to_input"),
    "transcoder-hook-out": (saelens_edit("transcoder", metadata={"hook_name_out": None}), CFG, "hook_name_out"),
    "square": (saelens_edit(d_sae=D_IN), CFG, "d_sae"),
    "pre6-tanh-relu": (lambda tmp: pre6_folder(tmp, activation_fn_str="tanh-relu"), CFG, "activation_fn_str"),
    "pre6-finetuning-scaling": (lambda tmp: pre6_folder(tmp, finetuning_scaling_factor=True), CFG,
                                "finetuning_scaling_factor"),
    "pre6-topk-without-k": (lambda tmp: pre6_folder(tmp, activation_fn_str="topk"), CFG, "activation_fn_kwargs.k"),
    "sparsify-signed": (sparsify_edit(signed=True), CFG, "signed"),
    "sparsify-activation": (sparsify_edit(activation="jumprelu"), CFG, "activation"),
    "sparsify-groupmax-k": (sparsify_edit(activation="groupmax", k=5), CFG, "k"),
    "sparsify-square": (sparsify_edit(num_latents=D_IN), CFG, "num_latents"),
    "sparsify-transposed": (sparsify_transposed, "sae.safetensors", "encoder.weight"),
    "sparsify-old-transcoder": (old_sparsify_transcoder, CFG, "transcode"),
    "not-a-dictionary-folder": (lambda tmp: tmp, "", "cfg.json"),
}


@pytest.mark.parametrize(("build", "file", "field"), REFUSALS.values(), ids=REFUSALS.keys())
def test_refusal(tmp_path: Path, build: Callable[[Path], Path], file: str, field: str) -> None:
    path = build(tmp_path)
    with pytest.raises(DictionaryError) as raised:
        load_dictionaries(path)
    message = str(raised.value)
    assert str(path / file).rstrip("/") in message and field in message and "\n" not in message, message
