"""Random-weight models in real models' shapes, and random top-k SAEs, for benchmarks on a machine that has neither
the real weights nor a network.

    python bench/random_models.py model OUT --shape smollm2-135m|llama-1b [--small] [--device cuda] [--dtype bfloat16]
    python bench/random_models.py sae OUT --d-in 576 --d-sae 16384 --k 32 --hook blocks.15.hook_resid_post [--relu]

A model is a LLaMA of the shape's config saved with save_pretrained beside SmolLM2's tokenizer (from
bench/device_assets); --small shrinks it for a run on a CPU. An SAE is written in SAELens's format by the
trainer's own writer; with --relu it is a `standard` (ReLU) SAE instead, which keeps no fixed number of features a
token: its inputs rescaled to norm sqrt(d_in) (`constant_norm_rescale`), each pre-activation is about a standard
normal, and a bias at its (1 - k / d_sae) quantile lets about k fire, more on some tokens and fewer on others. Each
prints the folder it wrote.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "device_assets"
TOKENIZER_ASSET = ASSETS / "smollm2_tokenizer.json.gz"  # SmolLM2-135M-Instruct's tokenizer.json

# SmolLM2-135M(-Instruct)'s config.json, as the embedded model's converted copy has it; random weights stand in.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu",
                    max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                    eos_token_id=2, pad_token_id=2, attention_bias=False, mlp_bias=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
LLAMA_1B = dict(SMOLLM2_135M, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64)  # 1.07B parameters, 131,072 MLP neurons
SHAPES = {"smollm2-135m": SMOLLM2_135M, "llama-1b": LLAMA_1B}
SMALL = {"smollm2-135m": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=32),
         "llama-1b": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32)}
SMOLLM2_SPECIAL = dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                       unk_token="<|endoftext|>")


def make_model(folder: Path, shape: dict, device: str, dtype: str) -> Path:
    """A LLaMA of the given config with random weights, initialised on the device (a 1B model's init on a CPU
    takes long), saved in `dtype` with SmolLM2's tokenizer."""
    import tokenizers
    import torch
    import transformers

    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer.from_str(gzip.decompress(TOKENIZER_ASSET.read_bytes()).decode("utf-8"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **SMOLLM2_SPECIAL).save_pretrained(folder)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**shape),
                                                              dtype=getattr(torch, dtype))
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"made {folder}: {n_params / 1e6:,.0f}M parameters, {shape['num_hidden_layers']} layers x "
          f"{shape['intermediate_size']} neurons, {dtype}, {size / 1e6:,.0f} MB, in {time.perf_counter() - t0:.1f}s")
    return folder


def make_sae(folder: Path, d_in: int, d_sae: int, k: int, hook: str, seed: int = 2, relu: bool = False) -> Path:
    """A random top-k SAE in SAELens's format (unit-norm decoder rows, its transpose as the encoder); relu: a
    standard SAE letting about k features fire a token (see the module's docstring)."""
    import json
    from statistics import NormalDist

    import torch

    from featureatlas.harvest.train_sae import TrainResult, save_saelens_folder

    g = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=1)
    result = TrainResult(W_enc=w.T.clone(), b_enc=torch.zeros(d_sae), W_dec=w, b_dec=torch.zeros(d_in), k=k,
                         fvu=1.0, l0=float(k), dead_fraction=0.0, steps=0, seconds=0.0)
    out = save_saelens_folder(result, folder, hook_name=hook, model_name="random", context_size=64,
                              prepend_bos=True, dataset_path="random", overwrite=True)
    if relu:
        from safetensors.torch import save_file

        threshold = NormalDist().inv_cdf(1 - k / d_sae)
        cfg = json.loads((out / "cfg.json").read_text())
        cfg.update(architecture="standard", normalize_activations="constant_norm_rescale")
        del cfg["k"]
        (out / "cfg.json").write_text(json.dumps(cfg, indent=2))
        save_file({"W_enc": result.W_enc.contiguous(), "b_enc": torch.full((d_sae,), -threshold),
                   "W_dec": result.W_dec.contiguous(), "b_dec": result.b_dec}, str(out / "sae_weights.safetensors"))
    print(f"made {out}: {d_sae:,} features on {hook}, " + (f"ReLU, about {k} firing" if relu else f"top-{k}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = ap.add_subparsers(dest="kind", required=True)
    model = kinds.add_parser("model", help="a random LLaMA in a real model's shape")
    model.add_argument("out", type=Path)
    model.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    model.add_argument("--small", action="store_true", help="a few layers of a few units (for a CPU)")
    model.add_argument("--device", default="cpu")
    model.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    sae = kinds.add_parser("sae", help="a random top-k SAE in SAELens's format")
    sae.add_argument("out", type=Path)
    sae.add_argument("--d-in", type=int, required=True)
    sae.add_argument("--d-sae", type=int, default=16384)
    sae.add_argument("--k", type=int, default=32)
    sae.add_argument("--hook", required=True, help="e.g. blocks.15.hook_resid_post")
    sae.add_argument("--relu", action="store_true", help="a ReLU SAE letting about k features fire a token")
    args = ap.parse_args()
    if args.kind == "model":
        make_model(args.out, {**SHAPES[args.shape], **(SMALL[args.shape] if args.small else {})}, args.device,
                   args.dtype)
    else:
        make_sae(args.out, args.d_in, args.d_sae, args.k, args.hook, relu=args.relu)


if __name__ == "__main__":
    main()
