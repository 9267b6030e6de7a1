"""Tiny randomly initialised transformers models, each saved as a folder `featureatlas harvest --model` accepts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def one_thread() -> Iterator[None]:
    """Torch on one thread while a module's tests run (use as a module fixture): tiny matrices gain nothing from
    threads, and lose a lot when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TRAINING_TEXT = """The quick brown fox jumps over the lazy dog. To be, or not to be, that is the question.
Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,
or to take arms against a sea of troubles. 1234567890 <script>alert("x")</script> café naïve — ü
"""

HIDDEN, LAYERS, VOCAB = 32, 3, 300


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<bos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TRAINING_TEXT] * 4, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>")


def tiny_config(model_type: str, **overrides: object) -> transformers.PretrainedConfig:
    """overrides: fields of a LLaMA-like config to change, e.g. num_attention_heads=4, num_key_value_heads=2."""
    common = dict(vocab_size=VOCAB, bos_token_id=0, pad_token_id=1, eos_token_id=0)
    if model_type == "gpt2":
        return transformers.GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=2, n_inner=48, n_positions=128, **common)
    if model_type == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                                          intermediate_size=48, max_position_embeddings=128, **common)
    if model_type == "opt":
        return transformers.OPTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                                      ffn_dim=48, word_embed_proj_dim=HIDDEN, max_position_embeddings=128, **common)
    llama_like = dict(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128, **common) | overrides
    if model_type == "gemma":
        return transformers.GemmaConfig(head_dim=16, **llama_like)
    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config}[model_type]
    return config_class(**llama_like)


MODEL_TYPES = ["gpt2", "gpt_neox", "opt", "llama", "mistral", "qwen2", "gemma"]


def save_tiny_model(model_type: str, folder: Path, seed: int = 0, **overrides: object) -> Path:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    with torch.no_grad():  # random init is small; widen it so activations are varied and ties are rare
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text(TRAINING_TEXT * 3)
    (folder / "b.txt").write_text("A short one.\n")
    (folder / "c.txt").write_text("   \n\n")  # empty: skipped
    (folder / "d.txt").write_text("whether the fox is lazy or quick, the question is to be " * 9)
    return folder


def saelens_sae(folder: Path, d_in: int, hook: str, seed: int = 1) -> Path:
    """A small random top-k SAE saved in SAELens's format by the trainer's own writer."""
    from featureatlas.harvest.train_sae import TrainResult, save_saelens_folder
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.functional.normalize(torch.randn(40, d_in, generator=g), dim=1)
    result = TrainResult(W_enc=w.T.clone(), b_enc=torch.zeros(40), W_dec=w, b_dec=torch.zeros(d_in), k=4, fvu=1.0,
                         l0=4.0, dead_fraction=0.0, steps=0, seconds=0.0)
    return save_saelens_folder(result, folder, hook_name=hook, model_name="tiny", context_size=16, prepend_bos=True,
                               dataset_path="corpus")


def harvest_small_store(root: Path, logits: int = 3) -> tuple[Path, Path, Path]:
    """A llama store of neurons (signed: every example kind), residual dims and SAE features, through the CLI;
    returns (store, model folder, SAE folder). Shared by the probe and verify tests."""
    from featureatlas.cli import main

    model, corpus = save_tiny_model("llama", root / "model"), write_corpus(root / "corpus")
    sae = saelens_sae(root / "sae", 32, "blocks.1.hook_resid_post")
    store = root / "store.duckdb"
    assert main(["harvest", "--model", str(model), "--corpus", str(corpus), "--out", str(store), "--device", "cpu",
                 "--dtype", "float32", "--layers", "0-2", "--resid", "1", "--sae", f"res1={sae}", "--context-length",
                 "16", "--top-k", "3", "--batch-size", "5", "--intervals", "4", "--random-examples", "2",
                 "--compile", "off", "--logits", str(logits), "--tokens", "500"]) == 0
    return store, model, sae
