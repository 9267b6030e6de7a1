"""One build process's share of the work: open the store read-only once, then render jobs (layer slices)."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

from featureatlas.build import layer_pages, unit_pages
from featureatlas.build.examples import WINDOWS, SpanTails
from featureatlas.build.reader import LayerInfo, LayerKey, read_unit_chunk
from featureatlas.build.templates import make_environment
from featureatlas.store.schema import open_store

LAYER_ROOT = "../../../"  # from <model>/<source>/<layer>/ back to the site root


@dataclass(frozen=True)
class Job:
    """Either a layer page (first == stop) or the unit pages of units [first, stop) in unit order."""

    info: LayerInfo
    folder: str  # relative to the site root
    first: int
    stop: int
    neighbours: tuple[str | None, str | None] = (None, None)  # previous / next layer page, for layer pages

    @property
    def key(self) -> LayerKey:
        return self.info.key

    @property
    def is_layer_page(self) -> bool:
        return self.first == self.stop

    @property
    def model_anchor(self) -> str:
        """The model's id on the index page."""
        return "m-" + self.folder.split("/", 1)[0]


class Worker:
    """Holds what is worth keeping between jobs: the connection, the templates, the token cache."""

    def __init__(self, store_path: str, site_dir: str, bos_tokens: dict[str, str | None]):
        self.con = open_store(store_path)
        self.con.execute("SET threads TO 1")  # the processes are the parallelism
        env = make_environment()
        self.unit_template = env.get_template("unit.html")
        self.layer_template = env.get_template("layer.html")
        self.site_dir = Path(site_dir)
        self.bos_tokens = bos_tokens
        self.tails = SpanTails()

    def run(self, job: Job) -> tuple[int, int]:
        """Render one job; returns (pages, bytes) written."""
        folder = self.site_dir / job.folder
        folder.mkdir(parents=True, exist_ok=True)
        bos = self.bos_tokens.get(job.key.model)
        if job.is_layer_page:
            return 1, layer_pages.write_layer_page(self.con, job.info, self.layer_template, folder, LAYER_ROOT,
                                                   bos, job.neighbours, job.model_anchor)
        chunk = read_unit_chunk(self.con, job.key, job.first, job.stop, WINDOWS)
        page = unit_pages.PageContext(info=job.info, root=LAYER_ROOT, bos_token=bos, model_anchor=job.model_anchor)
        return unit_pages.write_unit_pages(chunk, page, self.unit_template, self.tails, folder)

    def close(self) -> None:
        self.con.close()


_worker: Worker | None = None


def init_process(store_path: str, site_dir: str, bos_tokens: dict[str, str | None]) -> None:
    """Pool initializer: one Worker per process. Ctrl-C is left to the parent, which stops the pool."""
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker = Worker(store_path, site_dir, bos_tokens)


def run_job(job: Job) -> tuple[int, int]:
    """Pool task: run a job in this process's Worker."""
    assert _worker is not None, "init_process was not called in this process"
    return _worker.run(job)
