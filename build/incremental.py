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

from featureatlas.build.reader import Catalog, _has_view
from featureatlas.build.shards import Postings
from featureatlas.build.templates import templates_dir

STATE_FILE = ".featureatlas-build.json.gz"
STATE_VERSION = 1


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
    if _has_view(con, "explanations"):
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
        try:
            data = json.loads(gzip.decompress((site / STATE_FILE).read_bytes()))
        except (OSError, ValueError, EOFError):
            return None
        if data.get("version") != STATE_VERSION:
            return None
        return cls(data["generator"], {tuple(layer["key"]): layer for layer in data["layers"]})

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


def link_tree(source: Path, target: Path) -> tuple[int, int]:
    """Hard-link (or copy, across filesystems) every file of a finished layer folder into the new site; returns
    (files, bytes). The old site stays untouched until the new one replaces it."""
    count = size = 0
    for folder, _, files in os.walk(source):
        destination = target / Path(folder).relative_to(source)
        destination.mkdir(parents=True, exist_ok=True)
        for name in files:
            src, dst = Path(folder) / name, destination / name
            try:
                os.link(src, dst)
            except OSError:
                dst.write_bytes(src.read_bytes())
            count, size = count + 1, size + dst.stat().st_size
    return count, size
