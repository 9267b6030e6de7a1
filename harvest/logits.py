"""Logit effects: what each unit's output direction does to the logits when read straight through the unembedding.

The direction is what the unit adds to the residual stream per unit of activation (a neuron's row of the MLP's
output projection, a residual dimension's basis vector, a dictionary feature's decoder row, mapped through the
output projection when the dictionary lives in neuron or head space), scaled by the final norm's gain, then
multiplied by the unembedding. It ignores everything downstream (later layers, the norm's division by the
residual's scale), so it says which tokens the direction points at, not what the unit causes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from featureatlas.atomic import written_whole
from featureatlas.cachedir import cache_root
from featureatlas.harvest.hooks import Hook, norm_gain
from featureatlas.harvest.sources import UnitSource
from featureatlas.load.architectures import Architecture, architecture_of, get_submodule, input_to_output_matrix
from featureatlas.load.models import model_cache_enabled

_CHUNK = 1024  # units per matmul against the whole vocabulary
_BLOCK = 64    # vocabulary entries per block in extremes()


def output_directions(source: UnitSource, backbone: torch.nn.Module, arch: Architecture, d_model: int
                      ) -> torch.Tensor | None:
    """[units, d_model] in the residual stream, or None when the source's output space is not one we can map."""
    if source.kind == "resid":
        return torch.eye(d_model, device=next(backbone.parameters()).device)
    if source.kind == "mlp":
        return _to_residual(None, source.hook, backbone, arch)
    if source.kind == "attn":
        return None  # a head writes what it attends to: no one direction, so no logit effects
    assert source.dictionary is not None and source.output_hook is not None
    return _to_residual(source.dictionary.decoder.float(), source.output_hook, backbone, arch)


def _to_residual(vectors: torch.Tensor | None, hook: Hook, backbone: torch.nn.Module, arch: Architecture
                 ) -> torch.Tensor | None:
    """Vectors in the hook's space -> residual stream (None vectors: the space's own basis)."""
    block = f"{arch.blocks}.{hook.layer}"
    if hook.space == "residual":
        return vectors
    if hook.space == "neurons":
        out = input_to_output_matrix(get_submodule(backbone, f"{block}.{arch.mlp_out_proj}")).float()
        if arch.post_mlp_norm:
            out = out * norm_gain(get_submodule(backbone, f"{block}.{arch.post_mlp_norm}"), out.shape[1])
    elif hook.space == "heads":
        out = input_to_output_matrix(get_submodule(backbone, f"{block}.{arch.attn_out_proj}")).float()
    else:
        return None
    return out if vectors is None else vectors @ out


Effects = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class LogitEffects:
    """Every source's logit effects for one model: the readout (the unembedding with the final norm's gain folded
    in) built once. About 0.6 s of matrix products per layer of SmolLM2's neurons on a 2-core CPU, 20 s or so
    with every layer: so results are kept in the featureatlas cache (models.model_cache_enabled says whether),
    keyed by a hash of the exact directions, readout and n they come from, and a later harvest of the same model
    reads them back instead (a file per source, 24 bytes per unit and token)."""

    def __init__(self, model: torch.nn.Module, n: int = 10):
        self.backbone = model.base_model
        self.arch = architecture_of(model.config.model_type)
        unembed = model.get_output_embeddings()
        self.readout: torch.Tensor | None = None
        if n and unembed is not None:
            d_model = unembed.weight.shape[1]
            gain = norm_gain(get_submodule(self.backbone, self.arch.final_norm), d_model)
            self.readout = (unembed.weight.detach().float() * gain).T  # [d_model, vocab]
            n = min(n, self.readout.shape[1])
        self.n = n
        self.cache = model_cache_enabled()  # read here: the calls may come from a worker thread, outside the context
        self._readout_hash: bytes | None = None

    def __call__(self, source: UnitSource) -> Effects | None:
        """(top ids, top effects, bottom ids, bottom effects), each [units, n]; None when n is 0 or the source's
        output space has no way to the residual stream."""
        if self.readout is None:
            return None
        directions = output_directions(source, self.backbone, self.arch, self.readout.shape[0])
        if directions is None or directions.shape[1] != self.readout.shape[0]:
            return None
        basis = source.kind == "resid"
        cached = self._cache_file(directions, basis)
        if cached is not None and cached.is_file():
            found = _read(cached, directions.shape[0], self.n)
            if found is not None:
                return tuple(t.to(directions.device) for t in found)  # type: ignore[return-value]
        parts = []
        with torch.inference_mode():
            for logits in _logits_by_chunk(directions, self.readout, basis):
                parts.append((*extremes(logits, self.n, largest=True), *extremes(logits, self.n, largest=False)))
        effects: Effects = tuple(torch.cat([p[i] for p in parts]) for i in range(4))  # type: ignore[assignment]
        if cached is not None:
            _write(cached, effects)
        return effects

    def _cache_file(self, directions: torch.Tensor, basis: bool) -> Path | None:
        if not self.cache:
            return None
        if self._readout_hash is None:
            self._readout_hash = _digest(self.readout)
        key = hashlib.sha256(_CACHE_VERSION + self._readout_hash + _digest(directions)
                             + f"{self.n} {basis}".encode())
        return cache_root() / "logits" / f"{key.hexdigest()[:32]}.safetensors"


_CACHE_VERSION = b"logit-effects-2"  # bump when what is computed from the same inputs changes


def _digest(tensor: torch.Tensor) -> bytes:
    array = tensor.detach().float().contiguous().cpu().numpy()
    return hashlib.sha256(f"{tuple(array.shape)}".encode() + memoryview(array).cast("B")).digest()


def _read(path: Path, n_units: int, n: int) -> Effects | None:
    """A cached entry, or None if it is unreadable or not of the expected shapes (then it is computed again)."""
    try:
        tensors = load_file(path, device="cpu")  # safetensors: tensors only, never code
        found = tuple(tensors[str(i)] for i in range(4))
    except Exception:  # a damaged file of any kind: recompute and overwrite it
        return None
    if not all(tuple(t.shape) == (n_units, n) for t in found):
        return None
    return found  # type: ignore[return-value]


def _write(path: Path, effects: Effects) -> None:
    """Best effort (a read-only cache only costs the next run the recompute); whole or not at all."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(path) as temp:  # a full disk mid-write leaves no partial file behind
            save_file({str(i): t.cpu().contiguous() for i, t in enumerate(effects)}, temp)
    except OSError:
        pass


def _logits_by_chunk(directions: torch.Tensor, readout: torch.Tensor, basis: bool) -> Iterator[torch.Tensor]:
    """The units' logits, up to _CHUNK units at a time. Basis vectors (residual dimensions) need no product: their
    logits are the readout's own rows. Otherwise every chunk reuses one buffer (200 MB for SmolLM2's vocabulary):
    allocated afresh, each chunk's would be new pages to fault in, 49k of them (a thread's allocations that large
    are mapped anew)."""
    if basis:
        rows = readout.contiguous()
        for start in range(0, rows.shape[0], _CHUNK):
            yield rows[start:start + _CHUNK]
        return
    buffer = torch.empty((min(_CHUNK, directions.shape[0]), readout.shape[1]), device=readout.device)
    for start in range(0, directions.shape[0], _CHUNK):
        chunk = directions[start:start + _CHUNK].float()
        yield torch.mm(chunk, readout, out=buffer[:chunk.shape[0]])


def extremes(rows: torch.Tensor, n: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of each row's n largest (or smallest) entries, as topk gives them, in about half of
    its time over a whole vocabulary: the n best entries lie in the n blocks of _BLOCK whose own best is best
    (fewer than n blocks hold an entry strictly better than the n-th, and each tie of it adds one), so topk runs
    on the blocks' bests, then on those n blocks' entries and the few past the last whole block."""
    width = rows.shape[1]
    whole = width - width % _BLOCK
    if whole < 4 * n * _BLOCK:
        found = rows.topk(n, dim=1, largest=largest)
        return found.indices, found.values
    blocks = rows[:, :whole].view(rows.shape[0], whole // _BLOCK, _BLOCK)  # a view: column slices keep stride 1
    best = blocks.amax(dim=2) if largest else blocks.amin(dim=2)
    chosen = best.topk(n, dim=1, largest=largest).indices                              # [rows, n]
    columns = (chosen[:, :, None] * _BLOCK + torch.arange(_BLOCK, device=rows.device)).flatten(1)
    rest = torch.arange(whole, width, device=rows.device).expand(rows.shape[0], -1)
    columns = torch.cat([columns, rest], dim=1)
    found = rows.gather(1, columns).topk(n, dim=1, largest=largest)
    return columns.gather(1, found.indices), found.values
