"""Reopen a harvest run recorded in a store: its row of `runs`, its model and tokenizer (the recorded model_ref,
or where the model is now), its dtype and device, and its sources rebuilt by harvest's own build_sources and
checked against the store's `sources`.

verify, probe (so also `serve --store`) and the notebook API read a store's run through here alone, so a store is
reopened one way: the same activations code, the same dictionaries, the same checks and messages.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import torch

from featureatlas.errors import UsageError, setting_name
from featureatlas.harvest.config import HarvestConfig
from featureatlas.harvest.run import build_sources
from featureatlas.harvest.sources import UnitSource
from featureatlas.load.models import ModelLoadError, load_model, pick_device, pick_dtype, resolve_model
from featureatlas.store.schema import open_store

if TYPE_CHECKING:  # for type hints only: importing them takes seconds
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Run:
    """One row of a store's `runs`: what reopening a run and rebuilding its batches needs."""

    model: str
    model_ref: str
    dtype: str
    device: str
    context_length: int
    batch_size: int
    bos_excluded: bool
    n_contexts: int
    settings: str            # JSON: the harvest's options (`shard` says which contexts a shard's store ran)
    n_tokens: int


_RUNS = f"SELECT {', '.join(f.name for f in fields(Run))} FROM runs ORDER BY run_id"


def read_runs(con: duckdb.DuckDBPyConnection) -> list[Run]:
    """Every run of the store in the order they were recorded (a merged store holds several, of one model or
    more)."""
    return [Run(*row) for row in con.execute(_RUNS).fetchall()]


def run_device(choice: str, recorded: str) -> torch.device:
    """auto: the run's own device when this machine has it (the same kernels, so the same bits), else the best."""
    if choice != "auto":
        return pick_device(choice)
    if recorded.startswith("cuda") and not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(recorded.split(":")[0]) if recorded.split(":")[0] in ("cpu", "cuda") else pick_device("auto")


def run_dtype(name: str, device: torch.device, store: Path) -> torch.dtype:
    """The torch dtype of a run's recorded dtype name; one the harvest never uses is an error naming the store."""
    try:
        return pick_dtype(name, device)
    except KeyError:
        raise UsageError(f"{store}: the run's dtype {name!r} is not one harvest uses") from None


def dictionary_specs(con: duckdb.DuckDBPyConnection, model: str, saes: list[str]) -> list[str]:
    """The [NAME=]PATH specs that rebuild the store's dictionary sources of `model`: the user's `saes`, then
    NAME=RECORDED_PATH for each source they do not name. A recorded folder that is gone is an error naming the
    source and the fix. Cheap: call it before loading any model, so a moved folder costs seconds, not minutes."""
    claimed = {_spec_label(spec) for spec in saes}  # a folder of several gives NAME/SUBFOLDER labels
    specs = list(saes)
    for source, layer, path, hooks in con.execute(
            "SELECT source, min(layer), dictionary_path, list(DISTINCT hook_name) FILTER (WHERE dictionary_format = "
            "'gemma_scope' AND kind = 'sae') FROM sources WHERE model = ? AND dictionary_path IS NOT NULL "
            "GROUP BY source, dictionary_path ORDER BY source", [model]).fetchall():
        label = source.split(":", 1)[1]
        if any(label == c or label.startswith(c + "/") for c in claimed):
            continue
        if not Path(path).exists():
            raise UsageError(f"source {source} (layer {layer}): its dictionary folder {path} is gone; pass "
                             f"{setting_name('saes')} {label}=PATH with the folder's new place")
        # a Gemma Scope SAE reads the hook it was harvested on, whether or not its folder's place says it (@HOOK)
        specs.append(f"{label}={path}" + (f"@{hooks[0]}" if hooks and len(hooks) == 1 else ""))
    return specs


def _spec_label(spec: str) -> str:
    """The source label a spec gives a single-dictionary folder (as build_sources names it)."""
    if "=" in spec and not Path(spec).exists():
        return spec.rpartition("=")[0]
    return Path(spec).name


def _spec_path(spec: str) -> str:
    return spec.rpartition("=")[2] if "=" in spec and not Path(spec).exists() else spec


def rebuild_sources(con: duckdb.DuckDBPyConnection, store: Path, run: Run, model: PreTrainedModel,
                    specs: list[str], saes: list[str], model_ref: str, device: torch.device
                    ) -> dict[tuple[str, int], UnitSource]:
    """The store's sources of the run's model, rebuilt by harvest's build_sources from `specs` (see
    dictionary_specs), each checked to read the hook it was harvested from with as many units. A dictionary the
    user gave (`saes`) that rebuilds a source the store does not hold is an error: it was meant for another one."""
    stored = con.execute("SELECT source, layer, kind, hook_name, n_units FROM sources "
                         "WHERE model = ? ORDER BY source, layer", [run.model]).fetchall()
    mlp = [layer for _, layer, kind, *_ in stored if kind == "mlp"]
    resid = [layer for _, layer, kind, *_ in stored if kind == "resid"]
    heads = [layer for _, layer, kind, *_ in stored if kind == "attn"]
    harvest_config = HarvestConfig(model=model_ref, corpus=Path("."), out=Path(store),
                                   context_length=run.context_length, batch_size=run.batch_size,
                                   layers=",".join(map(str, mlp)) or "none",
                                   resid=",".join(map(str, resid)) or None, heads=",".join(map(str, heads)) or None,
                                   saes=specs, device=str(device))
    built = {(s.name, s.layer): s for s in build_sources(model, harvest_config, device)}
    keys = {(name, layer) for name, layer, *_ in stored}
    given = [Path(_spec_path(spec)).resolve() for spec in saes]
    for source in built.values():
        path = source.dictionary.path.resolve() if source.dictionary is not None else None
        if path is not None and (source.name, source.layer) not in keys and \
                any(path == p or p in path.parents for p in given):
            held = ", ".join(sorted({n for n, _ in keys if ":" in n})) or "none"
            raise UsageError(f"{setting_name('saes')}: {source.dictionary.path} gives source {source.name} "
                             f"(layer {source.layer}), "
                             f"which this store does not hold (its dictionary sources: {held}); name it as the "
                             f"store does, {setting_name('saes')} NAME=PATH")
    sources = {}
    for name, layer, kind, hook_name, n_units in stored:
        source = built.get((name, layer))
        if source is None:
            raise UsageError(f"source {name} (layer {layer}): no dictionary given rebuilds it; pass "
                             f"{setting_name('saes')} {name.split(':', 1)[-1]}=PATH")
        if (source.kind, source.hook.name, source.n_units) != (kind, hook_name, n_units):
            what = source.dictionary.path if source.dictionary is not None else "the model"
            raise UsageError(f"source {name} (layer {layer}): {what} gives a {source.kind} of {source.n_units} "
                             f"units on {source.hook.name}, but the store's is a {kind} of {n_units} units on "
                             f"{hook_name}; pass the dictionary this store was harvested with")
        sources[(name, layer)] = source
    return sources


@dataclass
class Reopened:
    """A store's run, loaded: the model and tokenizer in the run's dtype on the chosen device, and its sources."""

    run: Run
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    sources: dict[tuple[str, int], UnitSource]   # (source name, layer) -> source, every one the store holds


def reopen(con: duckdb.DuckDBPyConnection, store: Path, run: Run, *, model: str | None = None,
           saes: list[str] | None = None, device: str = "auto", specs: list[str] | None = None) -> Reopened:
    """Load `run` of the open store: `model` stands in for the recorded model_ref and `saes` ([NAME=]PATH) for
    recorded dictionary folders, where they have moved; `device` auto picks the run's own when this machine has it.
    `specs`: dictionary_specs already computed (default: computed here, before the model loads)."""
    saes = list(saes or [])
    specs = dictionary_specs(con, run.model, saes) if specs is None else specs
    torch_device = run_device(device, run.device)
    dtype = run_dtype(run.dtype, torch_device, store)
    try:
        ref = resolve_model(model or run.model_ref)
    except ModelLoadError as err:
        if model is not None:
            raise
        raise ModelLoadError(f"{err} (the run's recorded model); pass {setting_name('model')} to where it is "
                             f"now") from None
    loaded, tokenizer = load_model(ref, torch_device, dtype)
    sources = rebuild_sources(con, store, run, loaded, specs, saes, model or run.model_ref, torch_device)
    return Reopened(run, loaded, tokenizer, torch_device, dtype, sources)


def reopen_store(store: Path | str, *, model_name: str | None = None, model: str | None = None,
                 saes: list[str] | None = None, device: str = "auto") -> Reopened:
    """The first run of one model of a store file (`model_name`, which a store of several models needs), loaded
    as reopen loads it; the store is closed again before this returns."""
    store = Path(store)
    con = open_store(store)
    try:
        runs = read_runs(con)
        names = sorted({r.model for r in runs})
        if not runs:
            raise UsageError(f"{store}: records no harvest run, so no model to probe with")
        if model_name is None and len(names) > 1:
            raise UsageError(f"{store}: holds runs of {len(names)} models ({', '.join(names)}); name one in the "
                             "address (MODEL::mlp/12/345)")
        name = model_name or names[0]
        run = next((r for r in runs if r.model == name), None)
        if run is None:
            raise UsageError(f"{store}: no run of model {name!r}; it holds {', '.join(names)}")
        return reopen(con, store, run, model=model, saes=saes, device=device)
    finally:
        con.close()
