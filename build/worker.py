"""One build process's share of the work: open the store read-only once, then run jobs (a layer's pages, or
one data shard of a layer)."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

from featureatlas.build import layer_pages
from featureatlas.build.reader import LayerInfo, LayerKey, UnitStats, Windows, read_layer_stats, read_unit_chunk
from featureatlas.build.shards import SHARD_UNITS, Postings, card_key, data_key, js_file, neighbour_links, render_shard
from featureatlas.build.templates import make_environment
from featureatlas.store.schema import open_store

LAYER_ROOT = "../../../"  # from <model>/<source>/<layer>/ back to the site root
# Tokens shown before and after the max (min) token: for top examples as Neuroscope does (it shows ~50 before
# and ~10 after), for the rest a glance. Pages and shards then do not grow with the context length.
WINDOWS = Windows(top=(32, 8), other=(10, 4))


@dataclass(frozen=True)
class Job:
    """Either a layer's pages (shard is None: its unit table and its unit page) or one data shard of it."""

    info: LayerInfo
    folder: str  # relative to the site root
    layer_index: int  # in the search manifest's list of layers
    shard: int | None = None
    neighbours: tuple[str | None, str | None] = (None, None)  # previous / next layer page, for layer pages

    @property
    def key(self) -> LayerKey:
        return self.info.key

    @property
    def model_anchor(self) -> str:
        """The model's id on the index page."""
        return "m-" + self.folder.split("/", 1)[0]


@dataclass
class JobResult:
    files: int
    bytes: int
    units: int
    layer_index: int
    postings: Postings | None = None


class Worker:
    """Holds what is worth keeping between jobs: the connection, the templates, the last layer's statistics."""

    def __init__(self, store_path: str, site_dir: str, bos_tokens: dict[str, str | None], full_paths: bool = False,
                 layers: list[dict] | None = None):
        self.con = open_store(store_path, threads=1)  # the processes are the parallelism
        self.env = make_environment(full_paths)
        self.site_dir = Path(site_dir)
        self.bos_tokens = bos_tokens
        self.layers = layers or []  # the plan's layers (SitePlan.layers): where a neighbour's page is
        self._stats: tuple[LayerKey, UnitStats] | None = None

    def stats(self, key: LayerKey) -> UnitStats:
        if self._stats is None or self._stats[0] != key:
            self._stats = (key, read_layer_stats(self.con, key))
        return self._stats[1]

    def run(self, job: Job) -> JobResult:
        folder = self.site_dir / job.folder
        folder.mkdir(parents=True, exist_ok=True)
        bos = self.bos_tokens.get(job.key.model)
        if job.shard is None:
            size = layer_pages.write_layer_pages(self.con, job.info, self.env, folder, job.folder, LAYER_ROOT, bos,
                                                 job.neighbours, job.model_anchor)
            return JobResult(2, size, 0, job.layer_index)
        stats = self.stats(job.key)
        first, stop = (int(i) for i in stats.units.searchsorted([job.shard * SHARD_UNITS,
                                                                 (job.shard + 1) * SHARD_UNITS]))
        if first == stop:
            return JobResult(0, 0, 0, job.layer_index)
        chunk = read_unit_chunk(self.con, job.key, stats, first, stop, WINDOWS)
        shard, cards, postings = render_shard(chunk, bos, neighbour_links(job.key.model, job.folder, self.layers))
        size = 0
        for key, value in ((data_key(job.folder, job.shard), shard), (card_key(job.folder, job.shard), cards)):
            data = js_file(key, value)
            path = self.site_dir / f"{key}.js"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            size += len(data)
        return JobResult(2, size, stop - first, job.layer_index, postings)

    def close(self) -> None:
        self.con.close()


_worker: Worker | None = None


def init_process(store_path: str, site_dir: str, bos_tokens: dict[str, str | None], full_paths: bool,
                 layers: list[dict] | None = None) -> None:
    """Pool initializer: one Worker per process. Ctrl-C is left to the parent, which stops the pool."""
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker = Worker(store_path, site_dir, bos_tokens, full_paths, layers)


def run_job(job: Job) -> JobResult:
    """Pool task: run a job in this process's Worker."""
    assert _worker is not None, "init_process was not called in this process"
    return _worker.run(job)
