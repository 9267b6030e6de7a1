"""Readers for two released dictionary families that SAELens does not save itself: Gemma Scope's `params.npz`
folders and Llama Scope's `hyperparams.json` + `checkpoints/final.safetensors` folders.

Each builds the tensors SAELens's own converter builds from the same files (`gemma_2`, `gemma_2_transcoder` and
`llama_scope` in sae_lens/loading/pretrained_sae_loaders.py), op for op, so that the Dictionary's JumpReLU encode
is SAELens's bit for bit; anything those converters would read differently is refused with one line. The files
are untrusted: a .npz is checked member by member (names, dtypes, shapes, sizes against the file's own size)
before any array is read, and nothing in it is unpickled.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from numpy.lib import format as npy

from featureatlas.errors import DictionaryError
from featureatlas.load.dictionaries import (
    GEMMA_WEIGHTS,
    LLAMA_SCOPE_CONFIG,
    Dictionary,
    check_hook,
    check_orientation,
    check_tensors,
    positive_int,
    read_json,
    read_tensors,
    shown,
)

LLAMA_SCOPE_WEIGHTS = Path("checkpoints") / "final.safetensors"
GEMMA_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
MAX_MEMBERS = 16        # a params.npz holds five arrays (six with a scaling factor of ones)
NPZ_GROWTH = 16         # declared array bytes per byte of archive: weights barely compress, a zip bomb does
MAX_NPY_HEADER = 10_000  # numpy's own default bound on an .npy header
# A Gemma Scope repository's name says the site (google/gemma-scope-2b-pt-res, a hub cache's
# models--google--gemma-scope-9b-it-mlp, ...); a folder's `layer_N` says the layer.
_GEMMA_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)(?:-canonical)?(?![\w-])")
_LAYER = re.compile(r"layer_(\d{1,6})")
_TL_HOOK = re.compile(r"blocks\.(\d{1,6})\.[A-Za-z_][\w.]{0,63}")
GEMMA_SITES = {"res": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out", "att": "blocks.{}.attn.hook_z"}


def _error(file: Path, message: str) -> DictionaryError:
    return DictionaryError(f"{file}: {message}".replace("\n", " "))


# ---- Gemma Scope ---------------------------------------------------------------------------------------------

def load_gemma_scope(folder: Path, hook: str | None = None, where: str | None = None) -> Dictionary:
    """A Gemma Scope folder: params.npz (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec, threshold), a
    JumpReLU SAE on Gemma 2 that does not subtract b_dec. Its hook comes from where it lives, as SAELens derives
    it from the repository and folder names (`...-res/layer_12/...` reads blocks.12.hook_resid_post), or from
    `hook` (PATH@HOOK). where: 'REPO_ID/FOLDER' for a fetched release; a local folder's own path otherwise."""
    file = folder / GEMMA_WEIGHTS
    hook_name, hook_out, model_name = _gemma_hooks(file, Path(where) if where else folder.absolute(), hook)
    tensors = read_npz(file)
    d_in, d_sae = tensors["W_enc"].shape
    check_orientation(file, "W_enc", d_in, d_sae, d_in)
    transcoder = hook_out is not None
    return Dictionary(
        path=folder, format="gemma_scope", kind="transcoder" if transcoder else "sae",
        architecture="jumprelu_transcoder" if transcoder else "jumprelu", hook_name=hook_name, hook_reads="hook",
        hook_out_name=hook_out, d_in=d_in, d_sae=d_sae, d_out=d_in, dtype=torch.float32,
        config={"format": "gemma_scope", "hook_name": hook_name, "hook_name_out": hook_out, "model_name": model_name,
                "d_in": d_in, "d_sae": d_sae, "architecture": "jumprelu_transcoder" if transcoder else "jumprelu"},
        tensors=tensors, activation="jumprelu", subtract_b_dec=False)


def _gemma_hooks(file: Path, where: Path, hook: str | None) -> tuple[str, str | None, str | None]:
    """(hook_name, hook_name_out or None, model name or None) for a Gemma Scope folder at `where`."""
    repo = next((m for part in reversed(where.parts) if (m := _GEMMA_REPO.search(part))), None)
    size, tuned, site = repo.groups() if repo else (None, None, None)
    model_name = f"gemma-2-{size}" + ("-it" if tuned == "it" else "") if repo else None
    tail = where.parts[-3:]  # the layout under a repository: layer_N/width_W/average_l0_L
    if "embedding" in tail:
        raise _error(file, "an embedding SAE reads hook_embed (the scaled token embeddings), which featureatlas does "
                           "not hook; use one of a layer's")
    layers = [int(m.group(1)) for part in tail if (m := _LAYER.fullmatch(part))]
    layer = layers[-1] if layers else None
    if hook is not None:
        match = _TL_HOOK.fullmatch(hook)
        if site == "transcoders":
            raise _error(file, f"@{shown(hook)}: a Gemma Scope transcoder reads blocks.L.ln2.hook_normalized and "
                               "writes blocks.L.hook_mlp_out, which its repository's name says; drop @HOOK")
        if match is None:
            raise _error(file, f"@{shown(hook)} is not a TransformerLens hook name such as "
                               "blocks.12.hook_resid_post; name the hook this SAE reads")
        if layer is not None and int(match.group(1)) != layer:
            raise _error(file, f"@{shown(hook)} is on layer {match.group(1)}, but the folder says layer_{layer}; "
                               "name a hook of that layer")
        return hook, None, model_name
    if site is None or layer is None:
        raise _error(file, "Gemma Scope's params.npz does not say which hook it reads, and neither does this path "
                           "(a gemma-scope-*-res|mlp|att repository folder above layer_N/...); name it: PATH@"
                           "blocks.L.hook_resid_post (res), blocks.L.hook_mlp_out (mlp) or blocks.L.attn.hook_z (att)")
    if site == "transcoders":
        return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out", model_name
    return GEMMA_SITES[site].format(layer), None, model_name


def read_npz(file: Path) -> dict[str, torch.Tensor]:
    """params.npz's arrays as float32 tensors named as SAELens names them (`w_enc` becomes `W_enc`), after every
    member's header has been checked: a float dtype, a shape that fits the others, and exactly the bytes the
    member holds, all bounded by the file's own size. A `scaling_factor` of ones is dropped, as SAELens does."""
    headers = _npz_headers(file)
    shapes = _gemma_shapes(file, headers)
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {key: data[member] for key, member in shapes.items()}
    except Exception as e:  # numpy and zipfile raise many kinds (CRC, truncation, ...): each is one line
        raise _error(file, f"not a readable .npz ({_first_line(e)}); download it again") from None
    tensors = {key: torch.tensor(array).to(dtype=torch.float32) for key, array in arrays.items()}
    factor = tensors.pop("scaling_factor", None)
    if factor is not None and not torch.all(factor == 1):
        raise _error(file, "scaling_factor is not all ones: a fine-tuned scale SAELens refuses for Gemma Scope; fold "
                           "it into W_dec and drop it")
    return tensors


def _npz_headers(file: Path) -> dict[str, tuple[str, tuple[int, ...], np.dtype]]:
    """member name -> (key as SAELens names it, shape, dtype), read from each member's .npy header only."""
    try:
        size = file.stat().st_size
        with zipfile.ZipFile(file) as archive:
            members = archive.infolist()
            if len(members) > MAX_MEMBERS:
                raise _error(file, f"{len(members)} members; a Gemma Scope params.npz has {len(GEMMA_TENSORS)}")
            declared = sum(m.file_size for m in members)
            if declared > NPZ_GROWTH * size + 2**20:
                raise _error(file, f"its members unpack to {declared} bytes from {size}; not a params.npz (a zip "
                                   "bomb?)")
            headers = {}
            for member in members:
                if member.filename in headers:
                    raise _error(file, f"member {shown(member.filename)} twice; not a params.npz")
                headers[member.filename] = _npy_header(file, archive, member)
    except DictionaryError:
        raise
    except Exception as e:  # BadZipFile, truncation, encryption, unknown compression, bad headers, ...
        raise _error(file, f"not a readable .npz ({_first_line(e)}); download it again") from None
    return headers


def _npy_header(file: Path, archive: zipfile.ZipFile, member: zipfile.ZipInfo
                ) -> tuple[str, tuple[int, ...], np.dtype]:
    name = member.filename
    if not name.endswith(".npy") or "/" in name:
        raise _error(file, f"member {shown(name)} is not an array of a params.npz; download it again")
    key = "W_" + name[2:-4] if name.startswith("w_") else name[:-4]
    if key not in (*GEMMA_TENSORS, "scaling_factor"):
        raise _error(file, f"unexpected array {shown(key)} (expected {', '.join(GEMMA_TENSORS)}); not a Gemma Scope "
                           "params.npz")
    with archive.open(member) as fp:
        version = npy.read_magic(fp)
        read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
        if read is None:
            raise _error(file, f"array {key}: .npy version {version} is not one numpy writes for it; re-save it")
        shape, _, dtype = read(fp, max_header_size=MAX_NPY_HEADER)
        header = fp.tell()
    if dtype.hasobject or dtype.kind != "f" or dtype.itemsize not in (2, 4, 8) or not dtype.isnative \
            or dtype.shape != ():
        raise _error(file, f"array {key} is {shown(dtype.str)}, not a native float array (pickled objects are never "
                           "read); re-save it as float32")
    n = math.prod(shape)
    if n * dtype.itemsize != member.file_size - header:
        raise _error(file, f"array {key} declares shape {list(shape)} of {dtype.name}, which does not fit its "
                           f"{member.file_size - header} bytes; the file is truncated or corrupt")
    return key, tuple(shape), dtype


def _gemma_shapes(file: Path, headers: dict[str, tuple[str, tuple[int, ...], np.dtype]]) -> dict[str, str]:
    """key -> member, once every array's shape fits W_enc's [d_in, d_sae]."""
    by_key: dict[str, str] = {}
    for member, (key, _, _) in headers.items():
        if key in by_key:
            raise _error(file, f"array {key} twice ({by_key[key]}, {member}); not a Gemma Scope params.npz")
        by_key[key] = member
    missing = [key for key in GEMMA_TENSORS if key not in by_key]
    if missing:
        raise _error(file, f"array {', '.join(missing)} missing (expected {', '.join(GEMMA_TENSORS)}); the file is "
                           "incomplete or no Gemma Scope SAE")
    w_enc = headers[by_key["W_enc"]][1]
    if len(w_enc) != 2 or 0 in w_enc:
        raise _error(file, f"array W_enc has shape {list(w_enc)}, expected [d_in, d_sae]; re-save it")
    d_in, d_sae = w_enc
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
                "threshold": (d_sae,), "scaling_factor": (d_sae,)}
    for key, member in by_key.items():
        if headers[member][1] != expected[key]:
            raise _error(file, f"array {key} has shape {list(headers[member][1])}, expected {list(expected[key])} "
                               f"from W_enc's [d_in, d_sae]; the file is transposed or mixed")
    return by_key


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200] or type(e).__name__


# ---- Llama Scope ---------------------------------------------------------------------------------------------

def load_llama_scope(folder: Path, hook: str | None = None, fold: float | None = None) -> Dictionary:
    """A Llama Scope folder: hyperparams.json and checkpoints/final.safetensors (encoder.weight [d_sae, d_model],
    encoder.bias, decoder.weight [d_model, d_sae], decoder.bias), a JumpReLU SAE with one threshold for every
    feature, trained on inputs scaled to norm sqrt(d_model) on average (dataset_average_activation_norm.in).
    As SAELens reads it: the scale s = sqrt(d_model) / norm is folded into the weights (W_enc * s, W_dec / s,
    b_dec / s) and the threshold becomes jump_relu_threshold * s; all in float32. fold: a release's
    norm_scaling_factor from SAELens's directory, which SAELens folds in place of s (the threshold keeps s)."""
    file = folder / LLAMA_SCOPE_CONFIG
    hp = read_json(file)
    d_model, d_sae = positive_int(file, hp, "d_model"), positive_int(file, hp, "d_sae")
    for key, expected in (("act_fn", "jumprelu"), ("norm_activation", "dataset-wise"), ("sae_type", "sae")):
        if hp.get(key, expected) != expected:
            raise _error(file, f"{key} is {shown(hp[key])}: SAELens reads every Llama Scope folder as a {expected} "
                               f"SAE ({key} {expected}), so this one cannot be reproduced; use one that is")
    if hp.get("apply_decoder_bias_to_pre_encoder"):
        raise _error(file, "apply_decoder_bias_to_pre_encoder is true, which SAELens's reading ignores; use a "
                           "Llama Scope SAE that does not subtract its decoder bias")
    hook_in, hook_out = hp.get("hook_point_in"), hp.get("hook_point_out", hp.get("hook_point_in"))
    if not isinstance(hook_in, str) or not hook_in:
        raise _error(file, f"hook_point_in is {shown(hook_in)}: a dictionary must say where it reads; set it")
    if hook_out != hook_in:
        raise _error(file, f"hook_point_out {shown(hook_out)} differs from hook_point_in {shown(hook_in)}: a Llama "
                           "Scope transcoder, whose output scaling SAELens does not reproduce; use an SAE")
    check_hook(file, hook_in, hook)
    threshold = _finite(file, hp, "jump_relu_threshold")
    norms = hp.get("dataset_average_activation_norm")
    norm_in = _finite(file, norms if isinstance(norms, dict) else {}, "in", "dataset_average_activation_norm.in")
    if norm_in <= 0:
        raise _error(file, f"dataset_average_activation_norm.in is {shown(norm_in)}, not positive; fix it")
    check_orientation(file, "d_sae", d_model, d_sae, d_model)

    weights = folder / LLAMA_SCOPE_WEIGHTS
    if not weights.is_file():
        raise _error(folder, f"hyperparams.json has no {LLAMA_SCOPE_WEIGHTS} beside it; copy the released "
                             "checkpoints folder with it")
    t = read_tensors(weights, torch.float32)
    check_tensors(weights, t, {"encoder.weight": (d_sae, d_model), "encoder.bias": (d_sae,),
                               "decoder.weight": (d_model, d_sae), "decoder.bias": (d_model,)})
    scale = d_model**0.5 / norm_in
    fold = scale if fold is None else fold
    tensors = {"W_enc": t["encoder.weight"].T, "W_dec": t["decoder.weight"].T, "b_enc": t["encoder.bias"],
               "b_dec": t["decoder.bias"], "threshold": torch.ones(d_sae, dtype=torch.float32) * (threshold * scale)}
    tensors["W_enc"] *= fold  # SAELens's fold_activation_norm_scaling_factor, in place as it does
    tensors["W_dec"] /= fold
    tensors["b_dec"] /= fold
    return Dictionary(
        path=folder, format="llama_scope", kind="sae", architecture="jumprelu", hook_name=hook_in, hook_reads="hook",
        hook_out_name=None, d_in=d_model, d_sae=d_sae, d_out=d_model, dtype=torch.float32, config=hp,
        tensors=tensors, activation="jumprelu", subtract_b_dec=False)


def _finite(file: Path, cfg: dict, key: str, name: str | None = None) -> float:
    """The number as written (SAELens computes with it so), once it is known to be a finite one."""
    value = cfg.get(key)
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an integer too big for a float
        finite = False
    if not finite:
        raise _error(file, f"{name or key} is {shown(value)}, not a finite number; set it in the file")
    return value
