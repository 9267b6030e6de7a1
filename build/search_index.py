"""The search index: every term (a token units peak on or promote, a word of an explanation) -> the units it
finds, in files chosen by a hash of the term, so a query loads one small file a term, from `file://` too.

Files (format version 1), all loaded by search.js with `<script>` tags:
  search/manifest.js   {"v": 1, "shards": N, "shard_units": S, "layers": [{"model", "source", "layer", "path",
                        "noun", "n", "max_unit"}, ...]}  (unit addresses need no index: the URL is computable)
  search/t/<h>.js      {term: [[kind, layer index, unit, score], ...]} for the terms with fnv1a(term) % N == h;
                       kind 0: top examples peak on the token (score: how many), 1: a top logit (higher is a
                       better rank), 2: a word of an explanation. At most MAX_POSTINGS units per term and kind.
"""

from __future__ import annotations

from pathlib import Path

from featureatlas.build.shards import MAX_POSTINGS, SHARD_UNITS, Postings, js_file

FORMAT_VERSION = 1
UNITS_PER_TERM_SHARD = 500  # shards grow with units / 500, between 16 and 4,096 files


def fnv1a(term: str) -> int:
    """32-bit FNV-1a of the term's UTF-8 bytes: the same in search.js, and stable across builds."""
    h = 0x811C9DC5
    for byte in term.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def n_term_shards(n_units: int) -> int:
    """A power of two between 16 and 4,096, about one file per UNITS_PER_TERM_SHARD units."""
    n = 16
    while n < 4096 and n * UNITS_PER_TERM_SHARD < n_units:
        n *= 2
    return n


class SearchIndex:
    """Postings gathered from the shard jobs, written once at the end of a build."""

    def __init__(self) -> None:
        self.terms: dict[str, list[tuple[int, int, int, float]]] = {}

    def add(self, layer_index: int, postings: Postings) -> None:
        terms = self.terms
        for term, kind, unit, score in postings.rows:
            entries = terms.get(term)
            if entries is None:
                entries = terms[term] = []
            entries.append((kind, layer_index, unit, score))

    def write(self, site_dir: Path, layers: list[dict], n_units: int) -> tuple[int, int]:
        """Write the manifest and the term files; returns (files, bytes)."""
        n_shards = n_term_shards(n_units)
        shards: list[dict[str, list]] = [{} for _ in range(n_shards)]
        for term, entries in self.terms.items():
            entries.sort(key=lambda e: (e[0], -e[3], e[1], e[2]))
            kept, per_kind = [], [0, 0, 0]
            for kind, layer, unit, score in entries:
                if per_kind[kind] < MAX_POSTINGS:
                    per_kind[kind] += 1
                    kept.append([kind, layer, unit, score if score != int(score) else int(score)])
            shards[fnv1a(term) % n_shards][term] = kept
        folder = site_dir / "search" / "t"
        folder.mkdir(parents=True, exist_ok=True)
        files, size = 0, 0
        for h, shard in enumerate(shards):
            data = js_file(f"search/t/{h}", shard)
            (folder / f"{h}.js").write_bytes(data)
            files, size = files + 1, size + len(data)
        manifest = {"v": FORMAT_VERSION, "shards": n_shards, "shard_units": SHARD_UNITS, "layers": layers}
        data = js_file("search/manifest", manifest)
        (site_dir / "search" / "manifest.js").write_bytes(data)
        return files + 1, size + len(data)
