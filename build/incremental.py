"""What `build --incremental` needs: a fingerprint per layer of everything its files depend on, and the state a
build leaves in its site (fingerprints and search postings), so the next build re-renders only changed layers
and links the rest into place.

The state is one hidden file, `.featureatlas-build.json.gz`, in the site: per layer its folder, fingerprint and
search postings (a search index cannot be patched without them). Hosts that skip dot files skip it; it holds
nothing a public site does not show anyway.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import duckdb

from featureatlas.build.reader import Catalog, has_view
from featureatlas.build.shards import Postings
from featureatlas.build.templates import templates_dir
from featureatlas.errors import SiteError, setting_name

STATE_FILE = ".featureatlas-build.json.gz"
STATE_VERSION = 1
MAX_STATE_BYTES = 1 << 30  # decompressed: a site's state is untrusted, and gzip packs 1,000:1 or more


def generator_fingerprint(full_paths: bool) -> str:
    """Changes whenever the templates, the stylesheet, the script or the build code change."""
    digest = hashlib.sha256(f"{STATE_VERSION} {full_paths}".encode())
    for folder in (templates_dir(), Path(__file__).parent):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix in (".html", ".css", ".js", ".py"):
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def layer_fingerprints(con: duckdb.DuckDBPyConnection, catalog: Catalog, pages: dict[tuple, str]) -> dict[tuple, str]:
    """(model, source, layer) -> a digest of its runs, its `sources` row, its units' count, its explanations and
    how its pages link to others (pages: the folder and neighbours each layer's pages are rendered with)."""
    runs: dict[str, list] = {}
    for run in catalog.runs:
        runs.setdefault(run["model"], []).append([run.get("run_id"), str(run.get("finished_at")), run.get("n_tokens")])
    explained: dict[tuple, list] = {}
    if has_view(con, "explanations"):
        rows = con.execute("""SELECT model, source, layer, count(*), sum(hash(unit, text, score, author) % 1000000007)
                              FROM explanations GROUP BY ALL""").fetchall()
        explained = {(m, s, layer): [n, int(h)] for m, s, layer, n, h in rows}
    result = {}
    for info in catalog.layers:
        key = (info.key.model, info.key.source, info.key.layer)
        described = {k: v for k, v in vars(info).items() if k != "key"}
        payload = json.dumps([runs.get(info.key.model), described, explained.get(key), pages.get(key)],
                             sort_keys=True, default=str)
        result[key] = hashlib.sha256(payload.encode()).hexdigest()
    return result


class BuildState:
    """The previous build's fingerprints and postings, read from a site (empty when there is none or it is from
    another version of featureatlas)."""

    def __init__(self, generator: str, layers: dict[tuple, dict] | None = None):
        self.generator = generator
        self.layers: dict[tuple, dict] = layers or {}  # key -> {"folder", "fingerprint", "postings"}

    @classmethod
    def read(cls, site: Path) -> BuildState | None:
        path = site / STATE_FILE
        try:
            if path.is_symlink():
                return None
            with gzip.open(path, "rb") as fh:
                raw = fh.read(MAX_STATE_BYTES + 1)
            if len(raw) > MAX_STATE_BYTES:
                return None  # then every layer is rendered afresh
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                return None
            return cls(str(data["generator"]), {tuple(layer["key"]): layer for layer in data["layers"]})
        except (OSError, ValueError, EOFError, KeyError, TypeError):
            return None

    def add(self, key: tuple, folder: str, fingerprint: str, postings: Postings) -> None:
        entry = self.layers.setdefault(key, {"key": list(key), "folder": folder, "fingerprint": fingerprint,
                                             "postings": []})
        entry["postings"].extend(postings.rows)

    def postings(self, key: tuple) -> Postings:
        return Postings([tuple(row) for row in self.layers[key]["postings"]])

    def write(self, site: Path) -> int:
        data = gzip.compress(json.dumps({"version": STATE_VERSION, "generator": self.generator,
                                         "layers": list(self.layers.values())}, separators=(",", ":")).encode(), 6)
        (site / STATE_FILE).write_bytes(data)
        return len(data)


def link_tree(source: Path, target: Path, site: Path) -> tuple[int, int]:
    """Hard-link (or copy, across filesystems) every file of a finished layer folder of `site` into the new site;
    returns (files, bytes). The old site stays untouched until the new one replaces it. A site is untrusted: a
    link anywhere in the folder (which could lead to a user's files) stops the build instead of being followed."""
    root = site.resolve()
    if source.is_symlink() or not source.resolve().is_relative_to(root):
        raise SiteError(f"{source}: leads out of the site {site}; build without {setting_name('incremental')}")
    count = size = 0
    for folder, dirs, files in os.walk(source):
        for name in dirs + files:
            if (Path(folder) / name).is_symlink():
                raise SiteError(f"{Path(folder) / name}: is a symbolic link; an earlier build writes none, so "
                                f"build without {setting_name('incremental')}")
        destination = target / Path(folder).relative_to(source)
        destination.mkdir(parents=True, exist_ok=True)
        for name in files:
            src, dst = Path(folder) / name, destination / name
            try:
                os.link(src, dst, follow_symlinks=False)
            except OSError:
                dst.write_bytes(src.read_bytes())
            count, size = count + 1, size + dst.stat().st_size
    return count, size
