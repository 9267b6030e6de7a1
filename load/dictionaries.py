"""Strict loaders for sparse-autoencoder and transcoder folders: SAELens (6.x, and the flat pre-6 configs) and
EleutherAI sparsify (one folder per hookpoint, a run folder holding several) here; Gemma Scope and Llama Scope
folders in scope_formats.py; SAELens release ids and hub repositories fetched by sae_releases.py.

A Dictionary reproduces its format's own encode exactly (the same ops in the same order, in the same dtype), or
its folder is refused with one line naming the file, the field and what to do: a catalogue built on a silently
wrong encode is worse than none. /work/shared/SAE_FORMATS.md documents both formats.

Architecture names are SAELens's own (`standard`, `jumprelu`, `topk`, `abstopk`, `gated`, `transcoder`,
`skip_transcoder`, `jumprelu_transcoder`, `jumprelu_skip_transcoder`; BatchTopK and Matryoshka SAEs are saved
as `jumprelu`). Sparsify's are built the same way from its config: `topk` or `groupmax`, then `_skip` when it
has a skip connection, then `_transcoder` when it transcodes (e.g. `topk_skip_transcoder`).

Where a dictionary reads (`hook_name`, `hook_reads`):
- SAELens on a HookedTransformer: a TransformerLens hook name such as `blocks.6.hook_resid_post`, hook_reads
  'hook'. Attention `hook_z` dictionaries take the heads flattened, [..., n_heads * d_head].
- SAELens on AutoModelForCausalLM (metadata.model_class_name): a module path of the whole causal-LM model
  (`model.layers.6`), hook_reads 'output' (its first element when it returns a tuple).
- sparsify: a module path under `model.base_model` (the folder name, `layers.6`, `layers.6.mlp`); an SAE reads
  the module's output, a transcoder its input, and writes the same module's output (hook_out_name).
- Gemma Scope and Llama Scope: TransformerLens hook names, as SAELens's converters name them, hook_reads 'hook'.
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

from featureatlas.errors import DictionaryError

if TYPE_CHECKING:
    from featureatlas.load.sae_releases import Release

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_WEIGHTS = "params.npz"                # Gemma Scope (scope_formats.py)
LLAMA_SCOPE_CONFIG = "hyperparams.json"     # Llama Scope (scope_formats.py)
CONFIG_FILES = {"gemma_scope": GEMMA_WEIGHTS, "llama_scope": LLAMA_SCOPE_CONFIG}  # any other format: cfg.json
DTYPES = {name: getattr(torch, name) for name in ("float32", "float64", "float16", "bfloat16")}
DTYPES |= {f"torch.{name}": dtype for name, dtype in DTYPES.items()}  # SAELens accepts both spellings
# TransformerLens processing that changes the activations at hooks; plain transformers modules never apply it.
TL_PROCESSING = ("fold_ln", "center_writing_weights", "fold_value_biases", "refactor_factored_attn_matrices")
# SAELens architecture -> (encode function, extra tensors beside W_enc/W_dec/b_dec, is a transcoder)
SAELENS_ARCHITECTURES = {
    "standard": ("relu", ("b_enc",), False),
    "jumprelu": ("jumprelu", ("b_enc", "threshold"), False),
    "topk": ("topk", ("b_enc",), False),
    "abstopk": ("abstopk", ("b_enc",), False),
    "gated": ("gated", ("b_gate", "b_mag", "r_mag"), False),
    "transcoder": ("relu", ("b_enc",), True),
    "skip_transcoder": ("relu", ("b_enc", "W_skip"), True),
    "jumprelu_transcoder": ("jumprelu", ("b_enc", "threshold"), True),
    "jumprelu_skip_transcoder": ("jumprelu", ("b_enc", "threshold", "W_skip"), True),
}
TRAINING_ONLY = ("batchtopk", "matryoshka_batchtopk")  # SAELens saves their inference models as jumprelu
MAX_CONFIG_BYTES = 16 * 2**20  # of cfg.json and the other JSON files of a folder; real ones are a few kilobytes
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 60, 60, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 3


def _error(file: Path, message: str) -> DictionaryError:
    return DictionaryError(f"{file}: {message}".replace("\n", " "))


@dataclass
class Dictionary:
    """One SAE or transcoder, ready to turn hooked activations into feature activations."""

    path: Path                 # the folder holding cfg.json
    format: str                # 'saelens' | 'sparsify' | 'gemma_scope' | 'llama_scope'
    kind: str                  # 'sae' | 'transcoder'
    architecture: str
    hook_name: str
    hook_reads: str            # 'hook' (TransformerLens name), 'output' or 'input' (module path)
    hook_out_name: str | None  # transcoders: where the decoder writes; None for SAEs
    d_in: int
    d_sae: int
    d_out: int
    dtype: torch.dtype         # encode casts its input to this and computes in it
    config: dict               # cfg.json as read
    tensors: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    activation: str = "relu"   # key of ENCODERS
    normalize: str = "none"    # input normalisation done at run time: 'none' | 'constant_norm_rescale' | 'layer_norm'
    subtract_b_dec: bool = False
    k: int | None = None
    rescale_acts_by_decoder_norm: bool = False

    @property
    def most_nonzeros(self) -> int | None:
        """k where the encode keeps at most k features of a token (top-k kinds, sparsify's group max), else None."""
        return self.k if self.activation in KEEP_K else None

    @property
    def config_file(self) -> Path:
        """The file that says what this dictionary is, for messages about it."""
        return self.path / CONFIG_FILES.get(self.format, "cfg.json")

    def to(self, device: torch.device | str) -> Dictionary:
        """Moves the tensors; returns self."""
        self.tensors = {name: t.to(device) for name, t in self.tensors.items()}
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_in] -> [..., d_sae]: the format's own encode, step for step (SAELens's process_sae_in, then
        the architecture's encode; sparsify's SparseCoder.encode, scattered back to a dense tensor). It never
        waits for the host."""
        return self._encoded(x)[0]

    def encode_with_nonzeros(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encode(x), and the flat indices of its non-zero entries (in no particular order): a top-k encode knows
        them already, any other takes one pass to find them. The harvest's accumulators work from these (on a
        GPU, listing them waits for the host)."""
        dense, chosen = self._encoded(x)
        flat = dense.view(-1)
        if chosen is None:
            return dense, flat.nonzero().squeeze(1)
        chosen = chosen.reshape(-1, chosen.shape[-1])  # [positions, k] indices into each position's features
        index = (chosen + torch.arange(chosen.shape[0], device=chosen.device)[:, None] * self.d_sae).view(-1)
        return dense, index[flat[index] != 0]

    def _encoded(self, x: torch.Tensor) -> Encoded:
        x = x.to(self.dtype)
        if self.normalize == "constant_norm_rescale":
            x = x * (self.d_in**0.5 / x.norm(dim=-1, keepdim=True))
        elif self.normalize == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        if self.subtract_b_dec:
            x = x - self.tensors["b_dec"]
        return ENCODERS[self.activation](self, x)

    @property
    def decoder(self) -> torch.Tensor:
        """[d_sae, d_out]: row i is feature i's output direction."""
        return self.tensors["W_dec"]


def _pre(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    h = x @ d.tensors["W_enc"] + d.tensors["b_enc"]
    return h * d.tensors["W_dec"].norm(dim=-1) if d.rescale_acts_by_decoder_norm else h


Encoded = tuple[torch.Tensor, "torch.Tensor | None"]  # dense features; the indices a top-k chose (None: unknown)


def _relu(d: Dictionary, x: torch.Tensor) -> Encoded:
    return torch.relu(_pre(d, x)), None


def _jumprelu(d: Dictionary, x: torch.Tensor) -> Encoded:
    h = _pre(d, x)
    return torch.relu(h) * (h > d.tensors["threshold"]).to(h.dtype), None


def _topk(d: Dictionary, x: torch.Tensor) -> Encoded:
    """SAELens: the k largest pre-activations, then ReLU on them."""
    h = _pre(d, x)
    values, indices = torch.topk(h, k=d.k, dim=-1, sorted=False)
    return torch.zeros_like(h).scatter_(-1, indices, values.relu()), indices


def _abstopk(d: Dictionary, x: torch.Tensor) -> Encoded:
    """SAELens: the k largest |pre-activations|, signs kept."""
    h = _pre(d, x)
    indices = torch.topk(h.abs(), k=d.k, dim=-1, sorted=False).indices
    return torch.zeros_like(h).scatter_(-1, indices, h.gather(-1, indices)), indices


def _gated(d: Dictionary, x: torch.Tensor) -> Encoded:
    t = d.tensors
    active = (x @ t["W_enc"] + t["b_gate"] > 0).to(x.dtype)
    return active * torch.relu(x @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]), None


def _sparsify_pre(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    return F.relu(F.linear(x, d.tensors["encoder.weight"], d.tensors["encoder.bias"]))


def _sparsify_topk(d: Dictionary, x: torch.Tensor) -> Encoded:
    """sparsify: ReLU first, then the k largest."""
    pre = _sparsify_pre(d, x)
    values, indices = torch.topk(pre, d.k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values), indices


def _sparsify_groupmax(d: Dictionary, x: torch.Tensor) -> Encoded:
    """sparsify: the latents cut into k equal groups, each keeps its maximum."""
    groups = _sparsify_pre(d, x).unflatten(-1, (d.k, -1))
    values, indices = groups.max(dim=-1)
    dense = torch.zeros_like(groups).scatter_(-1, indices[..., None], values[..., None]).flatten(-2)
    return dense, indices + torch.arange(d.k, device=indices.device) * groups.shape[-1]


KEEP_K = ("topk", "abstopk", "sparsify_topk", "sparsify_groupmax")  # ENCODERS keeping at most k features a token
ENCODERS: dict[str, Callable[[Dictionary, torch.Tensor], Encoded]] = {
    "relu": _relu,
    "jumprelu": _jumprelu,
    "topk": _topk,
    "abstopk": _abstopk,
    "gated": _gated,
    "sparsify_topk": _sparsify_topk,
    "sparsify_groupmax": _sparsify_groupmax,
}


def load_dictionaries(path: str | Path) -> list[Dictionary]:
    """A SAELens folder (cfg.json + sae_weights.safetensors), a sparsify hookpoint folder (cfg.json +
    sae.safetensors), a Gemma Scope folder (params.npz), a Llama Scope folder (hyperparams.json +
    checkpoints/final.safetensors), or a folder of self-describing ones (a sparsify run, a Llama Scope repository)
    in natural order of folder name (layers.2 before layers.10).

    `PATH@HOOK` names the hook of a folder that does not say it (a Gemma Scope folder outside its repository's
    layout). A name that is no path here, `RELEASE/ID` (SAELens's pretrained directory) or `OWNER/REPO/FOLDER`
    (a hub repository), is fetched with sae-lens and huggingface_hub when both are installed and online."""
    name, folder, hook = str(path), Path(path), None
    if not folder.exists() and "@" in name:
        name, _, hook = name.rpartition("@")
        folder = Path(name)
    if not folder.exists():
        from featureatlas.load import sae_releases  # only a name that is no path needs it

        if sae_releases.looks_like_release(name):
            return [_load_release(sae_releases.fetch(sae_releases.find(name)), hook)]
    if _is_dictionary(folder):
        return [_load_folder(folder, hook)]
    if folder.is_dir():
        natural = lambda p: [int(s) if s.isdecimal() else s for s in re.split(r"(\d+)", p.name)]  # noqa: E731
        folders = sorted((p for p in folder.iterdir() if _is_dictionary(p) and not (p / GEMMA_WEIGHTS).is_file()),
                         key=natural)
        if folders and hook is not None:
            raise _error(folder, f"@{shown(hook)} names the hook of one dictionary, and this is a folder of "
                                 f"{len(folders)}; pass one dictionary's folder with @HOOK")
        if folders:
            return [_load_folder(p) for p in folders]
    raise _error(folder, "not a dictionary folder: expected cfg.json beside sae_weights.safetensors (SAELens) or "
                         "sae.safetensors (sparsify), params.npz (Gemma Scope), hyperparams.json (Llama Scope), or a "
                         "folder of such folders")


def _is_dictionary(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("cfg.json", GEMMA_WEIGHTS, LLAMA_SCOPE_CONFIG))


def _load_folder(folder: Path, hook: str | None = None, overrides: dict | None = None) -> Dictionary:
    """One folder, by the files in it; overrides: a SAELens release's config_overrides, applied as SAELens does
    (over cfg.json's top-level fields)."""
    from featureatlas.load import scope_formats  # the released families' readers build on this module

    if (folder / GEMMA_WEIGHTS).is_file():
        return scope_formats.load_gemma_scope(folder, hook)
    if (folder / LLAMA_SCOPE_CONFIG).is_file():
        return scope_formats.load_llama_scope(folder, hook)
    cfg = read_json(folder / "cfg.json") | (overrides or {})
    if (folder / SAELENS_WEIGHTS).is_file():
        found = _load_saelens(folder, cfg)
    elif (folder / SPARSIFY_WEIGHTS).is_file():
        found = _load_sparsify(folder, cfg)
    else:
        raise _error(folder, f"cfg.json has no weights beside it: expected {SAELENS_WEIGHTS} (SAELens) or "
                             f"{SPARSIFY_WEIGHTS} (sparsify); copy the weights file into the folder")
    check_hook(folder / "cfg.json", found.hook_name, hook)
    return found


def _load_release(release: Release, hook: str | None) -> Dictionary:
    """A fetched sae_releases.Release, read as SAELens's from_pretrained reads it (in float32, its default)."""
    from featureatlas.load import scope_formats

    assert release.local is not None, "fetch the release first"
    if release.converter in ("gemma_2", "gemma_2_transcoder"):
        return scope_formats.load_gemma_scope(release.local, hook, where=f"{release.repo_id}/{release.folder}")
    if release.converter == "llama_scope":
        return scope_formats.load_llama_scope(release.local, hook, fold=release.norm_scaling_factor)
    return _load_folder(release.local, hook, release.overrides | {"dtype": "float32"})


def check_hook(file: Path, hook_name: str, given: str | None) -> None:
    """PATH@HOOK on a folder that names its own hook: accepted only when they agree."""
    if given is not None and given != hook_name:
        raise _error(file, f"names its hook, {shown(hook_name)}, and @{shown(given)} differs; drop @HOOK (it is "
                           "for Gemma Scope folders, which do not say where they read)")


def read_json(file: Path) -> dict[str, Any]:
    """A config file: a few kilobytes, so one over MAX_CONFIG_BYTES is refused unread (it is no config)."""
    try:
        with open(file, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise _error(file, f"more than {MAX_CONFIG_BYTES >> 20} MiB, too big for a config; check the file")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: bad JSON, or too many digits
        raise _error(file, f"not readable JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__}); fix or "
                           "re-save the file") from None
    except RecursionError:
        raise _error(file, "not readable JSON (nested too deeply); fix or re-save the file") from None
    if not isinstance(data, dict):
        raise _error(file, "not a JSON object; a dictionary config is one")
    return data


def shown(value: object) -> str:
    """A config value quoted in a message: a repr cut short, however big or deeply nested the value is."""
    return _REPR.repr(value)


def positive_int(file: Path, cfg: dict, key: str, default: Any = None, name: str | None = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _error(file, f"{name or key} is {shown(value)}, not a positive integer; set it in the file")
    return value


def read_tensors(file: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor in the file, cast to dtype (None: the first tensor's, as sparsify does)."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types, OSError and others
        raise _error(file, f"not a readable safetensors file ({str(e).splitlines()[0]}); re-save it") from e
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise _error(file, f"tensor {key} is {t.dtype}, not floating point; re-save it as float")
    dtype = dtype or next(iter(tensors.values()), torch.empty(0)).dtype
    return {key: t.to(dtype) for key, t in tensors.items()}


def check_tensors(file: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Exactly these tensors with exactly these shapes: anything else is a format we do not know."""
    missing, extra = sorted(shapes.keys() - tensors.keys()), sorted(tensors.keys() - shapes.keys())
    if missing:
        raise _error(file, f"tensor {', '.join(missing)} missing (expected {', '.join(shapes)}); the file is "
                           "incomplete or of another architecture than cfg.json says")
    if extra:
        raise _error(file, f"unexpected tensor {', '.join(extra)} (expected {', '.join(shapes)}); the file is "
                           "a training checkpoint or of another architecture than cfg.json says")
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise _error(file, f"tensor {key} has shape {list(tensors[key].shape)}, expected {list(shape)} from "
                               "cfg.json; the file is transposed or does not belong to this config")


def check_orientation(file: Path, name: str, d_in: int, d_sae: int, d_out: int) -> None:
    if d_sae in (d_in, d_out):
        raise _error(file, f"{name} gives {d_sae} features, as many as d_in or d_out, so the weights' "
                           "orientation cannot be checked by their shape; such dictionaries are not supported")


def _is_saelens_6(cfg: dict) -> bool:
    """As SAELens decides: a config without sae_lens_version, or one before 6.0, is a flat pre-6 config."""
    meta = cfg.get("metadata")
    version = cfg.get("sae_lens_version") or (meta.get("sae_lens_version") if isinstance(meta, dict) else None)
    major = re.match(r"\d{1,9}", str(version or ""))
    return major is not None and int(major.group()) >= 6


def _load_saelens(folder: Path, cfg: dict) -> Dictionary:
    file = folder / "cfg.json"
    if _is_saelens_6(cfg):
        c, meta, mp = cfg, cfg.get("metadata"), "metadata."
        if not isinstance(meta, dict):
            raise _error(file, "metadata missing: a SAELens 6 config keeps hook_name there; re-save with SAELens")
    else:
        c = meta = _pre6(file, cfg)
        mp = ""

    arch = c.get("architecture")
    if arch in TRAINING_ONLY:
        raise _error(file, f"architecture {shown(arch)} is a SAELens training checkpoint; export the inference model "
                           "(save_inference_model saves it as jumprelu) and load that")
    if not isinstance(arch, str) or arch not in SAELENS_ARCHITECTURES:
        raise _error(file, f"architecture {shown(arch)} is not supported (supported: "
                           f"{', '.join(SAELENS_ARCHITECTURES)}); use a dictionary of one of these")
    activation, extra_tensors, transcoder = SAELENS_ARCHITECTURES[arch]
    d_in, d_sae = positive_int(file, c, "d_in"), positive_int(file, c, "d_sae")
    d_out = positive_int(file, c, "d_out") if transcoder else d_in
    dtype_name = c.get("dtype", "float32")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise _error(file, f"dtype {shown(dtype_name)} is unknown (known: {', '.join(DTYPES)}); set one of these")
    apply_b_dec = c.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise _error(file, f"apply_b_dec_to_input is {shown(apply_b_dec)}, not true or false; set one")
    if transcoder and apply_b_dec:
        raise _error(file, "apply_b_dec_to_input is true, which SAELens refuses for transcoders (b_dec is in the "
                           "output space); set it to false")
    normalize = c.get("normalize_activations", "none")
    if normalize not in ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in",
                         "covariance_whitening"):
        raise _error(file, f"normalize_activations {shown(normalize)} is unknown (known: none, constant_norm_rescale, "
                           "layer_norm, expected_average_only_in, covariance_whitening); set one of these")
    _check_scaler(folder, normalize)
    k = None
    if activation in ("topk", "abstopk"):
        k = positive_int(file, c, "k")
        if k > d_sae:
            raise _error(file, f"k is {k}, more than d_sae ({d_sae}); fix k")

    hook_name = meta.get("hook_name")
    if not isinstance(hook_name, str) or not hook_name:
        raise _error(file, f"{mp}hook_name is {shown(hook_name)}: a dictionary must say where it reads; set it")
    for key in ("hook_head_index", "hook_head_index_out"):
        if meta.get(key) is not None:
            raise _error(file, f"{mp}{key} is {shown(meta[key])}: dictionaries of a single attention head are not "
                               "supported; use one trained on the whole hook (hook_head_index null)")
    reshape = c.get("reshape_activations", "none")
    if reshape not in ("none", "hook_z") or (reshape == "hook_z" and not hook_name.endswith("_z")):
        raise _error(file, f"reshape_activations {shown(reshape)} with {mp}hook_name {shown(hook_name)}: only "
                           "'none', or 'hook_z' on a hook_z hook, is supported (as SAELens)")
    kwargs = meta.get("model_from_pretrained_kwargs") or {}
    for key in TL_PROCESSING:
        if isinstance(kwargs, dict) and kwargs.get(key):
            raise _error(file, f"{mp}model_from_pretrained_kwargs.{key} is true: the dictionary was trained on "
                               "TransformerLens-processed activations, which a transformers model does not produce; "
                               "use one trained without that processing")
    model_class = meta.get("model_class_name") or "HookedTransformer"
    if model_class not in ("HookedTransformer", "AutoModelForCausalLM"):
        raise _error(file, f"{mp}model_class_name {shown(model_class)} is not supported (HookedTransformer or "
                           "AutoModelForCausalLM): its hook names do not map onto a transformers model")
    hook_out = meta.get("hook_name_out") if transcoder else None
    if transcoder and (not isinstance(hook_out, str) or not hook_out):
        raise _error(file, f"{mp}hook_name_out is {shown(hook_out)}: a transcoder must say where its decoder writes; "
                           "set it")
    check_orientation(file, "d_sae", d_in, d_sae, d_out)

    weights = folder / SAELENS_WEIGHTS
    tensors = read_tensors(weights, DTYPES[dtype_name])
    _drop_unit_scaling_factor(weights, tensors, d_sae)
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "b_enc": (d_sae,),
              "threshold": (d_sae,), "b_gate": (d_sae,), "b_mag": (d_sae,), "r_mag": (d_sae,), "W_skip": (d_out, d_in)}
    check_tensors(weights, tensors, {key: shapes[key] for key in ("W_enc", "W_dec", "b_dec", *extra_tensors)})
    return Dictionary(
        path=folder, format="saelens", kind="transcoder" if transcoder else "sae", architecture=arch,
        hook_name=hook_name, hook_reads="output" if model_class == "AutoModelForCausalLM" else "hook",
        hook_out_name=hook_out, d_in=d_in, d_sae=d_sae, d_out=d_out, dtype=DTYPES[dtype_name], config=cfg,
        tensors=tensors, activation=activation,
        normalize=normalize if normalize in ("constant_norm_rescale", "layer_norm") else "none",
        subtract_b_dec=apply_b_dec, k=k, rescale_acts_by_decoder_norm=k is not None and bool(
            c.get("rescale_acts_by_decoder_norm", False)))


def _pre6(file: Path, cfg: dict) -> dict:
    """A flat pre-6 config as the 6.x fields, refusing what SAELens's own converter would silently change."""
    c = dict(cfg)
    for old, new in (("hook_point", "hook_name"), ("hook_point_head_index", "hook_head_index")):
        if old in cfg:
            c[new] = cfg[old]
    key = "activation_fn_str" if "activation_fn_str" in cfg else "activation_fn"
    activation = cfg.get(key, "relu")
    arch = cfg.get("architecture", "standard")
    if activation == "topk":
        if arch not in ("standard", "topk"):
            raise _error(file, f"{key} 'topk' with architecture {shown(arch)}: not a combination SAELens defines")
        kwargs = cfg.get("activation_fn_kwargs")
        c["k"] = positive_int(file, kwargs if isinstance(kwargs, dict) else {}, "k", name="activation_fn_kwargs.k")
        c["architecture"] = "topk"
    elif activation != "relu" or arch == "topk":
        raise _error(file, f"{key} {shown(activation)} with architecture {shown(arch)} is not supported (relu, or "
                           "topk with activation_fn_kwargs.k); SAELens would silently run it as ReLU")
    if cfg.get("finetuning_scaling_factor"):
        raise _error(file, "finetuning_scaling_factor is true: this SAE scales its features by a fine-tuned "
                           "factor that SAELens 6 no longer applies; fold it into W_dec and set it to false")
    normalize = cfg.get("normalize_activations")
    if isinstance(normalize, bool) or normalize is None:
        c["normalize_activations"] = "expected_average_only_in" if normalize else "none"
    c.setdefault("apply_b_dec_to_input", True)
    c.setdefault("architecture", "standard")
    c.setdefault("reshape_activations", "hook_z" if "hook_z" in str(c.get("hook_name", "")) else "none")
    return c


def _check_scaler(folder: Path, normalize: str) -> None:
    """SAELens folds the expected-norm factor and the whitening into the weights at the end of training and
    then writes normalize_activations 'none'; only a mid-run checkpoint still needs them, and SAELens's own
    encode would silently skip them."""
    scaler = folder / "activation_scaler.json"
    if scaler.is_file():
        state = read_json(scaler)
        if state.get("scaling_factor") is not None:
            raise _error(scaler, f"scaling_factor is {shown(state['scaling_factor'])}: a mid-run checkpoint whose "
                                 "input scaling is not folded into the weights; use the final model, or fold it "
                                 "(SAE.fold_activation_norm_scaling_factor) and save again")
        if state.get("has_whitening", True) and (folder / "activation_whitening.safetensors").is_file():
            raise _error(scaler, "has_whitening is true: a mid-run checkpoint whose whitening is not folded into "
                                 "the weights; use the final model, or fold it (SAE.fold_activation_whitening)")
    elif normalize in ("expected_average_only_in", "covariance_whitening"):
        raise _error(folder / "cfg.json", f"normalize_activations is {shown(normalize)}, which SAELens rewrites to "
                                          "'none' once it folds the factor into the weights, so this one is not "
                                          "folded; fold it and save again (or set 'none' if you know it is folded)")


def _drop_unit_scaling_factor(file: Path, tensors: dict[str, torch.Tensor], d_sae: int) -> None:
    """Old SAELens files carry a `scaling_factor` of ones, which SAELens drops; any other value is refused."""
    factor = tensors.pop("scaling_factor", None)
    if factor is not None and (tuple(factor.shape) != (d_sae,) or not torch.all(factor == 1)):
        raise _error(file, "tensor scaling_factor is not all ones: a finetuning scaling factor SAELens 6 does not "
                           "apply; fold it into W_dec and drop it")


def _load_sparsify(folder: Path, cfg: dict) -> Dictionary:
    file = folder / "cfg.json"
    if cfg.get("signed"):
        raise _error(file, "signed is true: signed top-k sparse coders (an early sparsify option) are not "
                           "supported; use an unsigned one")
    activation = cfg.get("activation", "topk")
    if activation not in ("topk", "groupmax"):
        raise _error(file, f"activation {shown(activation)} is unknown (known: topk, groupmax); set one of these")
    transcode, skip = bool(cfg.get("transcode", False)), bool(cfg.get("skip_connection", False))
    d_in, k = positive_int(file, cfg, "d_in"), positive_int(file, cfg, "k", 32)
    if cfg.get("num_latents"):  # 0 (the default) means d_in * expansion_factor
        d_sae = positive_int(file, cfg, "num_latents")
    else:
        d_sae = d_in * positive_int(file, cfg, "expansion_factor", 32)
    if k > d_sae or (activation == "groupmax" and d_sae % k):
        raise _error(file, f"k is {k}, which does not fit {d_sae} latents ({activation}); fix k or num_latents")
    for parent in (folder.parent, folder.parent.parent) if folder.parent.name == "best" else (folder.parent,):
        run_file = parent / "config.json"
        run = read_json(run_file) if run_file.is_file() else {}
        sae = run.get("sae") if isinstance(run.get("sae"), dict) else {}
        if (run.get("transcode") or sae.get("transcode")) and not transcode:
            raise _error(file, f"transcode is missing or false while {run_file} says transcode: true: an old "
                               "sparsify transcoder, which subtracted b_dec from its input; retrain it with a "
                               "current sparsify")
    check_orientation(file, "num_latents" if cfg.get("num_latents") else "expansion_factor", d_in, d_sae, d_in)

    weights = folder / SPARSIFY_WEIGHTS
    tensors = read_tensors(weights, None)
    shapes = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    check_tensors(weights, tensors, shapes | ({"W_skip": (d_in, d_in)} if skip else {}))
    return Dictionary(
        path=folder, format="sparsify", kind="transcoder" if transcode else "sae",
        architecture=activation + ("_skip" if skip else "") + ("_transcoder" if transcode else ""),
        hook_name=folder.name, hook_reads="input" if transcode else "output",
        hook_out_name=folder.name if transcode else None, d_in=d_in, d_sae=d_sae, d_out=d_in,
        dtype=next(iter(tensors.values())).dtype, config=cfg, tensors=tensors, activation=f"sparsify_{activation}",
        subtract_b_dec=not transcode, k=k)
