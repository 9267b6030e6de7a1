"""The settings of a harvest, of training a dictionary and of verifying a store: every default and its help text,
stated once.

Light to import (no torch, numpy or pyarrow), so that the command line can build its options from these fields
(featureatlas/commands/options.py) without loading a model's libraries. `validate` checks what can be checked before
a model loads; its messages name settings, which the command line shows as its flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featureatlas.errors import UsageError, setting_name
from featureatlas.settings import (
    DEFAULT_SPLIT,
    DEFAULT_TEXT_FIELD,
    device_setting,
    dictionaries_setting,
    dtype_setting,
    model_setting,
    setting,
)

CONTEXT_LENGTH = 64  # tokens per context, BOS included: harvest, train-sae and the demo
COMPILE = ("auto", "on", "off")
CORPUS_HELP = (".txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet or .arrow file, a folder of them (one saved with "
               "Dataset.save_to_disk too), a glob such as 'texts/*.txt', or a hub dataset NAME[:CONFIG] (online, "
               "streamed); read as a stream, never whole")
TEXT_FIELD_HELP = "field/column holding the text in .jsonl/.parquet/.arrow/hub rows"


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' as (i, n); the range is checked by validate."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"{text!r}: want I/N, e.g. 0/8") from None
    return i, n


@dataclass
class HarvestConfig:
    """What to harvest and how; each field's help is the command line's (`featureatlas harvest --help`)."""

    model: str = model_setting()
    corpus: Path = setting(help=CORPUS_HELP)
    out: Path = setting(help="store to write, e.g. atlas.duckdb")
    tokens: int | None = setting(None, "stop after this many text tokens", shown="the whole corpus")
    context_length: int = setting(CONTEXT_LENGTH, "tokens per context, BOS included")
    top_k: int = setting(20, "max-activating examples kept per unit")
    layers: str | None = setting(None, "layers whose MLP neurons to harvest, e.g. 0,5,10-12, or none", shown="all")
    resid: str | None = setting(None, "also harvest the residual-stream dimensions (hook_resid_post) of these "
                                      "layers; alone: all layers", shown="none", nargs="?", const="all",
                                metavar="LAYERS")
    heads: str | None = setting(None, "also harvest the attention heads of these layers (source attn: a head's "
                                      "activation is the norm of what it writes to the residual stream); alone: all "
                                      "layers", shown="none", nargs="?", const="all", metavar="LAYERS")
    saes: list[str] = dictionaries_setting("a dictionary folder to harvest: SAELens (cfg.json + "
                                           "sae_weights.safetensors), sparsify (cfg.json + sae.safetensors, or a "
                                           "run folder of them), Gemma Scope (params.npz), Llama Scope "
                                           "(hyperparams.json + checkpoints/), or a SAELens release id when "
                                           "online; repeatable (docs/dictionaries.md)")
    batch_size: int = setting(64, "contexts per forward pass")
    device: str = device_setting()
    dtype: str = dtype_setting()
    text_field: str = setting(DEFAULT_TEXT_FIELD, TEXT_FIELD_HELP)
    token_field: str | None = setting(None, "field/column of token ids (pre-tokenised data) to use as is instead "
                                            "of text", shown="input_ids or tokens when the records have no text "
                                                         "field", metavar="FIELD")
    split: str | None = setting(None, f"split of a hub dataset or of a folder saved from a DatasetDict (default: "
                                      f"{DEFAULT_SPLIT}); in other folders, keeps the files named for it "
                                      f"({DEFAULT_SPLIT}-00000.parquet, {DEFAULT_SPLIT}/...)")
    bottom_k: int | None = setting(None, "most negative examples kept per signed unit",
                                   shown="as many as --top-k")
    intervals: int = setting(12, "quantile intervals per unit, even; 0 for none")
    per_interval: int = setting(2, "examples per interval")
    random_examples: int = setting(4, "random examples where the unit fires")
    histogram_every: int = setting(32, "neurons and residual dimensions: the histogram counts every token of one "
                                       "context in N (dictionary features: every token)")
    logits: int = setting(10, "top and bottom tokens of each unit's logit effect; 0 for none")
    cooccurrence: bool = setting(True, "dictionary features: count the pairs that fire on the same tokens, from "
                                       "the non-zeros the harvest already has, and keep each feature's nearest by "
                                       "Jaccard index (cost: docs/harvest.md; keeps at most 8 million pairs, 128 "
                                       "MB, a dictionary; not with --shard or torchrun, whose merge cannot add "
                                       "the lists up)")
    neighbours_across: bool = setting(False, "also find each dictionary feature's nearest features in the other "
                                             "dictionaries of the same width, by decoder cosine (every pair "
                                             "compared: seconds on a GPU, minutes on a CPU for many large ones)")
    ablation_effects: bool = setting(False, "after the store is written, compute for each unit's top examples how "
                                            "removing the unit at the max token changes the log-probability of "
                                            "each token after it (two forward passes per example; the `ablations` "
                                            "view)")
    seed: int = setting(0, "seeds the quantile and random samples")
    compile: str = setting("auto", "fuse the per-batch steps with torch.compile (seconds to a minute): several "
                                   "times faster on GPUs; on CPUs the native loops (docs/harvest.md) already are, "
                                   "and it then speeds up only dictionary features; auto: for 1M+ tokens or the "
                                   "whole corpus", choices=COMPILE)
    fixed_shapes: bool | None = None     # dense units' lists in fixed shapes, no host syncs (None: on CUDA)
    cuda_graphs: bool = setting(True, "on CUDA, replay each layer's updates as a recorded CUDA graph instead of "
                                      "launching their small kernels one by one from Python")
    native: bool = True                  # on CPU: dense units updated by compiled loops (harvest/native.py)
    shard: tuple[int, int] | None = setting(None, "harvest only the contexts whose id is I mod N, for N separate "
                                                  "jobs (a SLURM or Ray array) whose stores `featureatlas merge` "
                                                  "joins exactly; torchrun needs no --shard",
                                            metavar="I/N", parse=parse_shard)
    checkpoint_every: int | None = setting(None, "save the whole harvest state beside --out (as OUT.checkpoint) "
                                                 "every this many tokens, atomically, so --resume can continue "
                                                 "after a crash", shown="never", metavar="TOKENS")
    resume: bool = setting(False, "continue from OUT.checkpoint with the same options; the store equals an "
                                  "uninterrupted run's")
    overwrite: bool = setting(False, "replace a store already at --out")
    progress: bool = True


def validate(config: HarvestConfig) -> None:
    """Everything that can be checked before loading a model, so mistakes cost seconds, not minutes."""
    from featureatlas.harvest.checkpoint import checkpoint_path
    from featureatlas.load.corpus import check_corpus
    from featureatlas.store.writer import check_writable_target

    for name, minimum in (("context_length", 2), ("top_k", 1), ("batch_size", 1), ("intervals", 0),
                          ("per_interval", 0), ("random_examples", 0), ("histogram_every", 1), ("logits", 0)):
        if getattr(config, name) < minimum:
            raise UsageError(f"{setting_name(name)} must be at least {minimum}")
    if config.compile not in COMPILE:
        raise UsageError(f"{setting_name('compile')} must be auto, on or off")
    if config.intervals % 2 or config.intervals > 1000:
        raise UsageError(f"{setting_name('intervals')} must be even (intervals merge in pairs when a unit's range "
                         "doubles) and at most 1000")
    if config.tokens is not None and config.tokens < 1:
        raise UsageError(f"{setting_name('tokens')} must be at least 1")
    if config.shard is not None and not 0 <= config.shard[0] < config.shard[1]:
        raise UsageError(f"{setting_name('shard')} {config.shard[0]}/{config.shard[1]}: want I/N with 0 <= I < N")
    if config.checkpoint_every is not None and config.checkpoint_every < 1:
        raise UsageError(f"{setting_name('checkpoint_every')} must be at least 1 token")
    check_corpus(config.corpus, config.split)
    check_writable_target(Path(config.out))
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        finished = " (finished; its checkpoint is stale)" if config.resume else ""
        raise UsageError(f"{out}: a store is already there{finished}; pass {setting_name('overwrite')} to replace "
                         f"it, or choose another {setting_name('out')}")
    if config.resume and not checkpoint_path(out).is_file():
        raise UsageError(f"{checkpoint_path(out)}: no checkpoint to resume from; run without "
                         f"{setting_name('resume')}")


@dataclass
class TrainSaeConfig:
    """What to train a dictionary on and how; each field's help is the command line's (`featureatlas train-sae`)."""

    hook: str = setting(help="TransformerLens hook name, e.g. blocks.12.hook_resid_post; with --transcode, the "
                             "module's path, e.g. layers.12.mlp")
    corpus: Path = setting(help=CORPUS_HELP)
    out: Path = setting(help="folder to write")
    model: str = model_setting()
    transcode: bool = setting(False, "train a transcoder of the --hook module instead: --out becomes a sparsify "
                                     "run folder holding OUT/MODULE/ (cfg.json, sae.safetensors)")
    features: int = setting(4096, "features")
    k: int = setting(32, "active features per token")
    tokens: int = setting(40_000, "tokens of activations to train on")
    steps: int | None = setting(None, "optimiser steps", shown="5 epochs")
    context_length: int = setting(CONTEXT_LENGTH, "tokens per context, BOS included")
    batch_size: int = 32                 # contexts per forward pass while collecting activations
    seed: int = setting(0, "seeds the initialisation and the order of the training tokens")
    text_field: str = setting(DEFAULT_TEXT_FIELD, TEXT_FIELD_HELP)
    device: str = device_setting()
    dtype: str = dtype_setting("model dtype (the SAE trains in float32)")
    overwrite: bool = setting(False, "replace an existing --out folder")
    progress: bool = True


def validate_training(config: TrainSaeConfig) -> None:
    """What can be checked before the model loads: the output folder, k, the hook's form and the corpus."""
    from featureatlas.load.corpus import check_corpus

    out = Path(config.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not config.overwrite:
        raise UsageError(f"{out}: already exists; choose another {setting_name('out')} or pass "
                         f"{setting_name('overwrite')} to replace it")
    if config.k < 1 or config.features < config.k:
        raise UsageError(f"{setting_name('k')} must be at least 1 and at most {setting_name('features')}")
    if config.context_length < 2:
        raise UsageError(f"{setting_name('context_length')} must be at least 2")
    if config.transcode and config.hook.startswith("blocks."):
        raise UsageError(f"{setting_name('hook')} {config.hook}: with {setting_name('transcode')}, name the module "
                         "to transcode as sparsify does, by its path in the model (e.g. layers.15.mlp)")
    check_corpus(config.corpus)


@dataclass
class VerifyConfig:
    """What to verify and how; each field's help is the command line's."""

    store: Path = setting(help="a .duckdb file written by harvest")
    sample: int = setting(200, "examples to check", metavar="N")
    model: str | None = model_setting("the model, where the run's recorded model_ref is not", default=None)
    saes: list[str] = dictionaries_setting("a dictionary folder for the source sae:NAME / transcoder:NAME, where its "
                                           "recorded dictionary_path is gone; repeatable (default: the recorded "
                                           "paths)")
    device: str = device_setting("auto: the run's device when this machine has it")
    seed: int = setting(0, "seeds the sample")
    rtol: float | None = setting(None, "tolerance relative to each unit's largest |activation|",
                                 shown="max(2 eps of the run's dtype, 1e-5): 1e-5 for float32, 0.0156 for bfloat16")
    progress: bool = setting(True, "show a progress bar")
