"""Build the static site from a store: plan the pages, render them in worker processes, publish atomically."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from featureatlas.build import worker
from featureatlas.build.index_page import write_index
from featureatlas.build.output import SiteError, check_target, publish, staging_dir, write_marker
from featureatlas.build.plan import SitePlan, plan_site
from featureatlas.build.reader import read_catalog
from featureatlas.build.templates import copy_static, make_environment
from featureatlas.store.schema import open_store

__all__ = ["BuildSummary", "SiteError", "build_site"]


@dataclass(frozen=True)
class BuildSummary:
    """What a build wrote, for the CLI to report."""

    pages: int
    bytes: int
    seconds: float
    index: Path

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds if self.seconds > 0 else 0.0


def _can_spawn() -> bool:
    """Spawned processes re-import the main script; impossible when it came from stdin or a notebook cell."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.exists(main_file)


def _run_jobs(plan: SitePlan, store_path: Path, site_dir: Path, bos_tokens: dict[str, str | None],
              workers: int) -> Iterator[tuple[int, int]]:
    """(pages, bytes) per finished job; in this process when workers == 1, else in spawned processes."""
    args = (str(store_path), str(site_dir), bos_tokens)
    if workers == 1:
        local = worker.Worker(*args)
        try:
            for job in plan.jobs:
                yield local.run(job)
        finally:
            local.close()
        return
    # spawn, not fork: the parent holds DuckDB and tqdm threads that a fork would copy mid-state.
    # An executor, not multiprocessing.Pool: a worker that dies or fails to start breaks it (an error here)
    # instead of being restarted forever.
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=worker.init_process, initargs=args)
    try:
        futures = [executor.submit(worker.run_job, job) for job in plan.jobs]
        for future in as_completed(futures):
            yield future.result()
    finally:
        # on an error, let running jobs finish so nothing writes into the staging folder once it is removed
        executor.shutdown(wait=True, cancel_futures=True)


def build_site(store_path: Path, out_dir: Path, workers: int | None = None, progress: bool = True) -> BuildSummary:
    """Render the whole site for a store into out_dir, which appears (or is replaced) only when complete."""
    started = time.perf_counter()
    store_path, out_dir = Path(store_path), Path(os.path.abspath(out_dir))  # abspath: "." has no name
    check_target(out_dir)
    con = open_store(store_path)
    try:
        catalog = read_catalog(con)
    finally:
        con.close()
    plan = plan_site(catalog)
    bos_tokens = {model: catalog.bos_token(model) for model in catalog.models()}
    workers = max(1, min(workers or os.cpu_count() or 1, len(plan.jobs)))
    if not _can_spawn():
        workers = 1

    staging = staging_dir(out_dir)
    try:
        copy_static(staging)
        pages, size = 1, write_index(catalog, plan, make_environment().get_template("index.html"), staging)
        with tqdm(total=plan.n_pages + 1, unit="page", disable=not progress, desc="site",
                  dynamic_ncols=True) as bar:
            bar.update(1)
            # closing(): on an error the pool is shut down before the staging folder is removed
            with closing(_run_jobs(plan, store_path, staging, bos_tokens, workers)) as results:
                try:
                    for job_pages, job_bytes in results:
                        pages += job_pages
                        size += job_bytes
                        bar.update(job_pages)
                except BrokenProcessPool as err:
                    raise SiteError(f"{out_dir}: a build process died (out of memory?); nothing was written; "
                                    "try again with fewer workers") from err
        write_marker(staging, store_path)
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BuildSummary(pages=pages, bytes=size, seconds=time.perf_counter() - started,
                        index=out_dir / "index.html")
