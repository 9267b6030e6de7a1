"""A small, honest top-k sparse autoencoder (and transcoder) trainer, and writers of the result as a SAELens 6.x
folder (SAEs) or an EleutherAI sparsify folder (transcoders).

The SAE is the standard top-k one (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):

    z = TopK(ReLU((x - b_dec) @ W_enc + b_enc))        x_hat = z @ W_dec + b_dec

A transcoder (Dunefsky et al. 2024; sparsify's `transcode`) reads a module's input x and predicts its output y
with the same code, without subtracting b_dec (which lives in y's space): z = TopK(ReLU(x @ W_enc + b_enc)),
y_hat = z @ W_dec + b_dec. SAELens has no top-k transcoder, so it is saved in sparsify's layout, which has.

trained on MSE plus their auxiliary top-k loss on dead latents, with unit-norm decoder rows. The input is used as
is (no normalisation), so the saved folder is SAELens's `topk` architecture with `normalize_activations: none`,
`apply_b_dec_to_input: true` and `rescale_acts_by_decoder_norm: false`, and SAELens's own encode of it equals
`encode_topk` (SAELens takes the top k first and then applies ReLU; ReLU is monotone, so both orders keep the
same values). It is meant for the demo: a 576 -> 4096 SAE trains on CPU in about a minute.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from featureatlas.atomic import remove_stale_temps, replace_folder, temp_path_beside

SAELENS_FORMAT_VERSION = "6.54.12"  # the SAELens release whose saved layout we write (and test against)
REPORT_FILENAME = "featureatlas_training.json"


@dataclass
class TrainConfig:
    n_features: int
    k: int
    steps: int | None = None  # optimiser steps; None: 5 epochs of the training rows, at least 200 steps
    batch_size: int = 4096  # activation vectors per step (capped at the number of training rows)
    lr: float | None = None  # None: 2e-4 / sqrt(n_features / 16384) (Gao et al.'s fit), times LR_BOOST
    seed: int = 0
    auxk: int | None = None  # latents in the auxiliary loss on dead latents; None: d_in // 2; 0 disables it
    dead_after: int = 100_000  # tokens without firing after which a latent counts as dead for the aux loss


@dataclass
class TrainResult:
    W_enc: torch.Tensor  # [d_in, n_features]
    b_enc: torch.Tensor  # [n_features]
    W_dec: torch.Tensor  # [n_features, d_in], rows unit norm
    b_dec: torch.Tensor  # [d_in]
    k: int
    fvu: float  # fraction of variance unexplained on the held-out rows
    l0: float  # mean number of non-zero features per held-out row
    dead_fraction: float  # fraction of features that are zero on every held-out row (encode_topk's output)
    steps: int
    seconds: float
    config: TrainConfig | None = None  # the config with every default resolved (steps, lr, auxk)
    n_train: int = 0
    n_heldout: int = 0
    transcoder: bool = False  # trained to predict targets from the activations (b_dec not subtracted)


HELDOUT_FRACTION = 0.1
MIN_HELDOUT = 500
AUXK_ALPHA = 1 / 32  # Gao et al.'s weight of the auxiliary loss
SEED_SIMILARITY = 0.6  # the largest cosine between two transcoder features' starting inputs (see _seed_rows)
LR_BOOST = 8.0  # Gao et al.'s rates are for billions of tokens; ours see about a million (8x: best FVU, no dead)


def encode_topk(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor | None,
                k: int) -> torch.Tensor:
    """Dense feature activations [..., n_features]: the k largest pre-activations, ReLU'd, the rest zero.
    The same operations in the same order as SAELens's TopKSAE.encode, so the results match bit for bit.
    b_dec None: a transcoder's encode, which subtracts nothing."""
    pre = (x if b_dec is None else x - b_dec) @ W_enc + b_enc
    values, indices = torch.topk(pre, k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


def decode(z: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    return z @ W_dec + b_dec


def train_topk_sae(activations: torch.Tensor, config: TrainConfig, progress: bool = True,
                   targets: torch.Tensor | None = None) -> TrainResult:
    """Train on activations [n_tokens, d_in], already collected from the model; with targets [n_tokens, d_out]
    (the module's output at the same tokens), a transcoder that predicts them.

    The last 10% of the rows (at least 500) are held out for the reported metrics, not a random 10%: in corpus
    order they come from later contexts and documents than the training rows, so neighbouring tokens of one
    context cannot flatter the metrics. Deterministic for a given seed (on a given machine and thread count).
    Rows with massive activations (attention sinks, hundreds of times the typical norm) dominate both the MSE
    and the FVU when present: drop them before calling if the typical token is what matters."""
    if activations.ndim != 2:
        raise ValueError(f"activations must be [n_tokens, d_in], got shape {tuple(activations.shape)}")
    n_rows, d_in = activations.shape
    n_heldout = max(int(n_rows * HELDOUT_FRACTION), min(MIN_HELDOUT, n_rows // 4))
    n_train = n_rows - n_heldout
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"too few activation vectors to train an SAE: {n_rows}")
    if not 0 < config.k <= config.n_features:
        raise ValueError(f"k must be in 1..n_features ({config.n_features}), got {config.k}")
    if config.batch_size < 1 or (config.steps or 0) < 0:
        raise ValueError(f"batch_size must be positive and steps not negative: {config}")
    if not bool(torch.isfinite(activations).all()):
        raise ValueError("activations contain NaN or infinite values")
    transcoder = targets is not None
    if targets is None:
        targets = activations
    elif targets.ndim != 2 or len(targets) != n_rows or not bool(torch.isfinite(targets).all()):
        raise ValueError(f"targets must be finite, [{n_rows}, d_out], got shape {tuple(targets.shape)}")
    batch_size = min(config.batch_size, n_train)
    steps = config.steps if config.steps is not None else max(200, math.ceil(5 * n_train / batch_size))
    lr = config.lr if config.lr is not None else LR_BOOST * 2e-4 / math.sqrt(config.n_features / 16384)
    auxk = config.auxk if config.auxk is not None else d_in // 2
    config = replace(config, steps=steps, lr=lr, auxk=auxk, batch_size=batch_size)
    train, heldout = activations[:n_train], activations[n_train:]
    train_y, heldout_y = targets[:n_train], targets[n_train:]

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    if not transcoder:  # tied: each feature starts reading the direction it writes
        W_dec = torch.randn(config.n_features, d_in, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc = W_dec.T.clone()
        b_enc = torch.zeros(config.n_features)
    else:  # each feature starts as one training token: reads its centred input, writes its centred output
        seeds = _seed_rows(train, config.n_features, gen)
        x_mean = train.float().mean(dim=0)
        W_enc = (train[seeds].float() - x_mean).T.contiguous()
        W_enc /= W_enc.norm(dim=0, keepdim=True).clamp(min=1e-12)
        W_dec = train_y[seeds].float() - train_y.float().mean(dim=0)
        W_dec /= W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
        b_enc = -(x_mean @ W_enc)  # no b_dec is subtracted: b_enc does the centring an SAE's b_dec does
    b_dec = train_y.float().mean(dim=0)
    params = [p.requires_grad_() for p in (W_enc, b_enc, W_dec, b_dec)]
    optimiser = torch.optim.Adam(params, lr=lr, eps=6.25e-10)
    warmup, decay_from = max(1, steps // 20), int(steps * 0.8)

    def lr_factor(step: int) -> float:  # linear warm-up, constant, linear decay to 0 over the last 20%
        return min(1.0, (step + 1) / warmup, (steps - step) / max(1, steps - decay_from))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor)
    tokens_since_fired = torch.zeros(config.n_features, dtype=torch.long)
    order = torch.empty(0, dtype=torch.long)
    name = "transcoder" if transcoder else "SAE"
    bar = tqdm(total=steps, desc=f"{name} {d_in}->{config.n_features} k={config.k}", unit="step",
               disable=not progress, leave=False)
    for step in range(steps):
        if len(order) < batch_size:  # a fresh shuffle each epoch; the remainder of the last one is dropped
            order = torch.randperm(n_train, generator=gen)
        chosen, order = order[:batch_size], order[batch_size:]
        x, y = train[chosen].float(), train_y[chosen].float()
        dead = tokens_since_fired >= config.dead_after
        fvu, aux, fired = _loss(x, y, W_enc, b_enc, W_dec, b_dec, config.k, auxk, dead, not transcoder)
        optimiser.zero_grad(set_to_none=True)
        (fvu + AUXK_ALPHA * aux).backward()
        with torch.no_grad():  # keep the decoder rows on the unit sphere: drop the radial part of the gradient
            W_dec.grad -= (W_dec.grad * W_dec).sum(dim=1, keepdim=True) * W_dec
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        tokens_since_fired += batch_size
        tokens_since_fired[fired] = 0
        bar.update()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(fvu=f"{fvu.item():.3f}", aux=f"{aux.item():.3f}", dead=int(dead.sum()))
    bar.close()

    weights = [p.detach().contiguous() for p in (W_enc, b_enc, W_dec, b_dec)]
    fvu, l0, dead_fraction = _evaluate(heldout, heldout_y, *weights, config.k, not transcoder)
    return TrainResult(*weights, k=config.k, fvu=fvu, l0=l0, dead_fraction=dead_fraction, steps=steps,
                       seconds=time.perf_counter() - start, config=config, n_train=n_train, n_heldout=n_heldout,
                       transcoder=transcoder)


def _seed_rows(train: torch.Tensor, n: int, gen: torch.Generator, block: int = 256) -> torch.Tensor:
    """The training rows a transcoder's features start from: taken in random order, each kept only if its centred
    input's cosine with every kept one is at most SEED_SIMILARITY (features started on near-duplicate tokens
    compete for the same tokens and most of them die: on the demo's layer-15 MLP, 21.8% dead features from
    uniformly random rows, 3.4% so, at the same variance unexplained); random rows fill up if too few qualify."""
    mean = train.float().mean(dim=0)
    kept = torch.empty(n, train.shape[1])
    chosen: list[int] = []
    for rows in torch.randperm(len(train), generator=gen).split(block):
        if len(chosen) == n:
            break
        unit = train[rows].float() - mean
        unit /= unit.norm(dim=1, keepdim=True).clamp(min=1e-12)
        before = len(chosen)
        fresh = torch.ones(len(rows), dtype=torch.bool)
        if before:
            fresh = (unit @ kept[:before].T).amax(dim=1) <= SEED_SIMILARITY
        for i in fresh.nonzero().squeeze(1).tolist():  # then against the ones kept from this block
            if len(chosen) > before and (kept[before:len(chosen)] @ unit[i]).max() > SEED_SIMILARITY:
                continue
            kept[len(chosen)] = unit[i]
            chosen.append(int(rows[i]))
            if len(chosen) == n:
                break
    rest = torch.randint(len(train), (n - len(chosen),), generator=gen)
    return torch.cat([torch.tensor(chosen, dtype=torch.long), rest])


def _loss(x: torch.Tensor, y: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
          b_dec: torch.Tensor, k: int, auxk: int, dead: torch.Tensor, subtract_b_dec: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FVU of the batch's prediction of y (x itself, for an SAE), the auxiliary loss, and the features that fired.

    The full [batch, n_features] pre-activations are only needed to choose the top k, so they are computed
    without autograd; only the chosen ones get gradients (_Chosen). The decoder gathers the k active rows
    (embedding_bag) instead of multiplying by the mostly-zero codes."""
    bias = b_enc - b_dec @ W_enc if subtract_b_dec else b_enc  # (x - b_dec) @ W_enc + b_enc == x @ W_enc + bias
    with torch.no_grad():
        pre = torch.addmm(bias, x, W_enc)
        indices = pre.topk(k, dim=-1, sorted=False).indices
    values = _Chosen.apply(pre, indices, x, W_enc, bias).relu()
    x_hat = F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + b_dec
    residual = y - x_hat
    total_variance = (y - y.mean(dim=0)).pow(2).sum()
    fvu = residual.pow(2).sum() / total_variance
    aux = fvu.new_zeros(())
    n_dead = int(dead.sum())
    if auxk > 0 and n_dead > 0:  # the top dead latents learn to predict what the live ones miss (Gao et al. B.1)
        dead_ids = dead.nonzero().squeeze(1)
        positions = pre[:, dead_ids].topk(min(auxk, n_dead), dim=-1, sorted=False).indices
        aux_values = _Chosen.apply(pre, dead_ids[positions], x, W_enc, bias).relu()
        z_dead = torch.zeros(len(x), n_dead).scatter(-1, positions, aux_values)
        residual_hat = z_dead @ W_dec[dead_ids]  # dense over the dead rows only: faster than gathering d_in // 2
        aux = min(n_dead / auxk, 1.0) * (residual_hat - residual.detach()).pow(2).sum() / total_variance
    return fvu, aux, indices[values > 0]


class _Chosen(torch.autograd.Function):
    """pre.gather(1, indices), where pre = x @ W_enc + bias, differentiable in W_enc and bias.

    Only k pre-activations per row get a gradient, so W_enc's is a sparse [n_features, batch] @ [batch, d_in]
    product: about 8x faster on CPU than autograd's dense one through the full pre-activations."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, indices: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(indices, x)
        ctx.n_features = W_enc.shape[1]
        return pre.gather(1, indices)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        indices, x = ctx.saved_tensors
        features, rows = indices.flatten(), torch.arange(len(x)).repeat_interleave(indices.shape[1])
        chosen = torch.sparse_coo_tensor(torch.stack([features, rows]), grad.flatten(), (ctx.n_features, len(x)),
                                         check_invariants=False)
        grad_bias = grad.new_zeros(ctx.n_features).index_add_(0, features, grad.flatten())
        return None, None, None, torch.sparse.mm(chosen, x).T, grad_bias


@torch.no_grad()
def _evaluate(x: torch.Tensor, y: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
              b_dec: torch.Tensor, k: int, subtract_b_dec: bool, chunk: int = 4096) -> tuple[float, float, float]:
    """FVU of the prediction of y (over y's mean), mean L0, and the fraction of features never non-zero, all on
    x, with the exact encode that is saved (encode_topk)."""
    mean = y.float().mean(dim=0)
    sq_error = total = active = 0.0
    fired = torch.zeros(W_enc.shape[1], dtype=torch.bool)
    for rows, want in zip(x.split(chunk), y.split(chunk), strict=True):
        rows, want = rows.float(), want.float()
        z = encode_topk(rows, W_enc, b_enc, b_dec if subtract_b_dec else None, k)
        sq_error += (want - decode(z, W_dec, b_dec)).double().pow(2).sum().item()
        total += (want - mean).double().pow(2).sum().item()
        nonzero = z > 0
        active += nonzero.sum().item()
        fired |= nonzero.any(dim=0)
    return sq_error / total, active / len(x), 1.0 - fired.float().mean().item()


def save_saelens_folder(result: TrainResult, folder: Path, *, hook_name: str, model_name: str, context_size: int,
                        prepend_bos: bool, dataset_path: str, extra_metadata: dict[str, Any] | None = None,
                        overwrite: bool = False) -> Path:
    """Write `folder` as SAELens 6.x saves a TopKSAE (cfg.json + sae_weights.safetensors), plus
    featureatlas_training.json (metrics and settings; SAELens ignores it).

    `hook_name` is the TransformerLens-style name (e.g. blocks.5.hook_resid_post); extra_metadata keys are added
    to cfg.json's metadata (e.g. hf_hook_name, model_class_name). The folder appears whole or not at all: it is
    written beside `folder` and renamed into place. An existing non-empty folder is refused unless overwrite."""
    if result.transcoder:
        raise ValueError("a top-k transcoder has no SAELens architecture; save it with save_sparsify_folder")
    d_sae, d_in = result.W_dec.shape
    metadata = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,  # not trained by SAELens
        "model_name": model_name, "hook_name": hook_name, "hook_head_index": None, "context_size": context_size,
        "prepend_bos": prepend_bos, "dataset_path": dataset_path, "model_from_pretrained_kwargs": {},
        "trained_by": "featureatlas", **(extra_metadata or {}),
    }
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "metadata": metadata, "k": result.k,
           "rescale_acts_by_decoder_norm": False, "architecture": "topk"}
    tensors = {"W_enc": result.W_enc, "b_enc": result.b_enc, "W_dec": result.W_dec, "b_dec": result.b_dec}
    return _write_folder(folder, "", "sae_weights.safetensors", tensors, cfg, result, overwrite)


def save_sparsify_folder(result: TrainResult, folder: Path, *, hookpoint: str, overwrite: bool = False) -> Path:
    """Write `folder` as a sparsify run holding one sparse coder, `folder/<hookpoint>/` (cfg.json +
    sae.safetensors, plus featureatlas_training.json): how sparsify saves a top-k transcoder (transcode: true)
    of the module at `hookpoint` (e.g. layers.15.mlp), which reads the module's input and predicts its output.
    Atomic and refusing to replace, as save_saelens_folder."""
    d_sae, d_out = result.W_dec.shape
    d_in = result.W_enc.shape[0]
    if d_in != d_out:
        raise ValueError(f"sparsify's layout needs the same input and output width, got {d_in} and {d_out}")
    cfg = {"activation": "topk", "expansion_factor": max(1, d_sae // d_in), "normalize_decoder": True,
           "num_latents": d_sae, "k": result.k, "multi_topk": False, "skip_connection": False,
           "transcode": result.transcoder, "d_in": d_in}
    tensors = {"encoder.weight": result.W_enc.T, "encoder.bias": result.b_enc, "W_dec": result.W_dec,
               "b_dec": result.b_dec}
    return _write_folder(folder, hookpoint, "sae.safetensors", tensors, cfg, result, overwrite)


def _write_folder(folder: Path, inner: str, weights_name: str, tensors: dict[str, torch.Tensor], cfg: dict,
                  result: TrainResult, overwrite: bool) -> Path:
    """folder (or folder/inner) with the weights, cfg.json and the training report; staged beside `folder` and
    renamed into place whole."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder; choose another output folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder}: folder exists and is not empty; choose another folder or pass "
                              "overwrite=True to replace it")
    report = {"fvu": result.fvu, "l0": result.l0, "dead_fraction": result.dead_fraction, "steps": result.steps,
              "seconds": result.seconds, "tokens_train": result.n_train, "tokens_heldout": result.n_heldout,
              "tokens_seen": result.steps * (result.config.batch_size if result.config else 0),
              "dead_fraction_measured_as": "features zero on every held-out row",
              "fvu_of": "the module's output, predicted from its input" if result.transcoder else "the input",
              "config": asdict(result.config) if result.config else None}
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    staging = temp_path_beside(folder)
    shutil.rmtree(staging, ignore_errors=True)
    target = staging / inner if inner else staging
    target.mkdir(parents=True)
    try:
        save_file({name: t.detach().float().contiguous().cpu() for name, t in tensors.items()},
                  str(target / weights_name))
        (target / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (target / REPORT_FILENAME).write_text(json.dumps(report, indent=2) + "\n")
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / inner if inner else folder
