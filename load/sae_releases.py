"""SAELens release ids and hub repositories, fetched to local folders for dictionaries.py to read.

`RELEASE/ID` (gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82) is looked up in sae-lens's pretrained
directory (its pretrained_saes.yaml, read without importing sae-lens, which would pull in TransformerLens): the
repository, the folder, the converter that reads it, its config overrides and norm scaling factor.
`OWNER/REPO/FOLDER` names a hub repository's folder directly, read as the directory reads that repository (else
as a SAELens folder). Only the files the converter reads are downloaded, and only for the converters
featureatlas reproduces; anything else, and any download that fails (offline), is one line.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from featureatlas.errors import DictionaryError

# SAELens converter (pretrained_saes.yaml's conversion_func; None is its own format) -> the files it reads
CONVERTER_FILES = {
    "sae_lens": ("cfg.json", "sae_weights.safetensors"),
    "gemma_2": ("params.npz",),
    "gemma_2_transcoder": ("params.npz",),
    "llama_scope": ("hyperparams.json", "checkpoints/final.safetensors"),
}
MAX_NAME = 500
FETCH_HINT = "download the folder and pass its path"


@dataclass(frozen=True)
class Release:
    """One dictionary of SAELens's directory (or of a hub repository), and where its files were put."""

    name: str                   # as the user wrote it
    repo_id: str
    folder: str                 # inside the repository
    converter: str              # SAELens's conversion_func; 'sae_lens' for its own format
    overrides: dict[str, Any] = field(default_factory=dict)  # config_overrides, over cfg.json as SAELens does
    norm_scaling_factor: float | None = None  # Llama Scope: the input scale SAELens folds into the weights
    local: Path | None = None   # the downloaded folder, once fetched


def looks_like_release(text: str) -> bool:
    """RELEASE/ID or OWNER/REPO/FOLDER, as opposed to a path that is simply missing (/x, ./x, ~/x, C:\\x)."""
    parts = text.split("/")
    return (len(parts) >= 2 and len(text) <= MAX_NAME and not text.startswith(("/", ".", "~")) and "\\" not in text
            and ":" not in text and all(part and part not in (".", "..") for part in parts))


def find(name: str) -> Release:
    """The release `name` names, from sae-lens's directory; a name it does not know is OWNER/REPO/FOLDER."""
    directory = _directory(name)
    parts = name.split("/")
    for cut in range(len(parts) - 1, 0, -1):
        release = "/".join(parts[:cut])
        if isinstance(directory.get(release), dict):
            return _from_directory(name, release, "/".join(parts[cut:]), directory[release])
    if len(parts) < 3:
        raise DictionaryError(f"{name}: no such folder here, and neither a release of sae-lens's directory nor a "
                              "hub repository's folder (OWNER/REPO/FOLDER); check the name")
    repo_id, folder = "/".join(parts[:2]), "/".join(parts[2:])
    for release, entry in directory.items():
        if isinstance(entry, dict) and entry.get("repo_id") == repo_id:  # read as the directory reads this repo
            ids = [sae.get("id") for sae in _saes(entry) if sae.get("path") == folder]
            if ids:
                return _from_directory(name, release, str(ids[0]), entry)
            return Release(name, repo_id, folder, _converter(name, release, entry))
    return Release(name, repo_id, folder, "sae_lens")


def _directory(name: str) -> dict[str, Any]:
    """sae-lens's pretrained_saes.yaml, parsed; an error naming the fix when sae-lens is not installed."""
    spec = importlib.util.find_spec("sae_lens")
    file = Path(spec.submodule_search_locations[0]) / "pretrained_saes.yaml" if spec and \
        spec.submodule_search_locations else None
    if file is None or not file.is_file():
        raise DictionaryError(f"{name}: no such folder here, and naming a SAELens release needs sae-lens installed "
                              f"(pip install sae-lens); or {FETCH_HINT}")
    try:
        return _parsed(file)
    except Exception as e:  # a broken install: no yaml, an unreadable file
        raise DictionaryError(f"{name}: sae-lens's directory {file} is not readable ({type(e).__name__}); "
                              f"reinstall sae-lens, or {FETCH_HINT}") from None


@functools.cache
def _parsed(file: Path) -> dict[str, Any]:
    """pretrained_saes.yaml is 1.5 MB: parsed once per process."""
    import yaml

    data = yaml.load(file.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return data if isinstance(data, dict) else {}


def _saes(entry: dict) -> list[dict]:
    saes = entry.get("saes")
    return [sae for sae in saes if isinstance(sae, dict)] if isinstance(saes, list) else []


def _converter(name: str, release: str, entry: dict) -> str:
    converter = entry.get("conversion_func") or "sae_lens"
    if converter not in CONVERTER_FILES:
        raise DictionaryError(f"{name}: SAELens reads release {release} with its {converter!r} converter, which "
                              f"featureatlas does not reproduce (it does: {', '.join(CONVERTER_FILES)}); use a "
                              "dictionary of one of these formats")
    return converter


def _from_directory(name: str, release: str, sae_id: str, entry: dict) -> Release:
    converter = _converter(name, release, entry)
    saes = {str(sae.get("id")): sae for sae in _saes(entry)}
    if sae_id not in saes:
        known = ", ".join(list(saes)[:3]) + (", ..." if len(saes) > 3 else "")
        raise DictionaryError(f"{name}: SAELens release {release} has no id {sae_id!r} (its ids: {known}); check "
                              "the id")
    sae, repo_id = saes[sae_id], entry.get("repo_id")
    if not isinstance(repo_id, str) or not isinstance(sae.get("path"), (str, int)):
        raise DictionaryError(f"{name}: sae-lens's directory gives no repository or path for it; {FETCH_HINT}")
    overrides = dict(entry.get("config_overrides") or {})
    overrides["neuronpedia_id"] = sae.get("neuronpedia")  # as SAELens's get_config_overrides adds it
    factor = sae.get("norm_scaling_factor")
    return Release(name, repo_id, str(sae["path"]), converter, overrides,
                   factor if isinstance(factor, (int, float)) and not isinstance(factor, bool) else None)


def fetch(release: Release) -> Release:
    """The release with `local` set: its converter's files downloaded (or found in the hub cache)."""
    try:
        from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise DictionaryError(f"{release.name}: fetching it needs huggingface_hub (pip install huggingface_hub); "
                              f"or {FETCH_HINT}") from None
    files = []
    for file in CONVERTER_FILES[release.converter]:
        try:
            files.append(Path(_download(release.repo_id, f"{release.folder}/{file}")))
        except RemoteEntryNotFoundError:
            raise DictionaryError(f"{release.name}: {release.repo_id} has no {release.folder}/{file}; check the "
                                  "name") from None
        except RepositoryNotFoundError:
            raise DictionaryError(f"{release.name}: no hub repository {release.repo_id} (or a gated one: log in "
                                  "with `hf auth login`); check the name") from None
        except Exception as e:  # offline, timeouts, HTTP errors, a full disk: the same advice
            first = (str(e).splitlines() or [""])[0][:120] or type(e).__name__
            raise DictionaryError(f"{release.name}: cannot download {file} from {release.repo_id} (offline? "
                                  f"{first}); {FETCH_HINT}") from None
    return replace(release, local=files[0].parent)


def _download(repo_id: str, filename: str) -> str:
    """One file of a hub repository, from huggingface_hub's cache or the hub."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=repo_id, filename=filename)
