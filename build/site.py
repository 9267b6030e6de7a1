"""Build the static site from a store: plan the pages and data shards, render them in worker processes, write
the search index, publish atomically."""

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

from featureatlas.atomic import staging_dir
from featureatlas.build import worker
from featureatlas.build.incremental import BuildState, generator_fingerprint, layer_fingerprints, link_tree
from featureatlas.build.index_page import write_index
from featureatlas.build.map_page import map_links, read_layouts, write_maps
from featureatlas.build.output import SiteError, check_target, is_site, publish, write_marker
from featureatlas.build.plan import plan_site
from featureatlas.build.reader import read_catalog
from featureatlas.build.search_index import SearchIndex
from featureatlas.build.shards import Postings
from featureatlas.build.templates import copy_static, make_environment, write_page
from featureatlas.store.schema import open_store

__all__ = ["BuildSummary", "SiteError", "build_site"]


@dataclass(frozen=True)
class BuildSummary:
    """What a build wrote, for the CLI to report."""

    files: int
    bytes: int
    units: int  # rendered
    seconds: float
    index: Path
    reused_units: int = 0  # linked unchanged from the previous build (--incremental)

    @property
    def units_per_second(self) -> float:
        return self.units / self.seconds if self.seconds > 0 else 0.0


def _can_spawn() -> bool:
    """Spawned processes re-import the main script; impossible when it came from stdin or a notebook cell."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.exists(main_file)


def _run_jobs(jobs: list[worker.Job], store_path: Path, site_dir: Path, bos_tokens: dict[str, str | None],
              workers: int, full_paths: bool, layers: list[dict]) -> Iterator[worker.JobResult]:
    """A result per finished job; in this process when workers == 1, else in spawned processes."""
    args = (str(store_path), str(site_dir), bos_tokens, full_paths, layers)
    if workers == 1:
        local = worker.Worker(*args)
        try:
            for job in jobs:
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
        futures = [executor.submit(worker.run_job, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()
    finally:
        # on an error, let running jobs finish so nothing writes into the staging folder once it is removed
        executor.shutdown(wait=True, cancel_futures=True)


def build_site(store_path: Path, out_dir: Path, workers: int | None = None, progress: bool = True,
               full_paths: bool = False, incremental: bool = False) -> BuildSummary:
    """Render the whole site for a store into out_dir, which appears (or is replaced) only when complete.
    Paths of the building machine (corpus, dictionaries) show as their last part unless full_paths. With
    incremental, layers whose data and pages did not change since the site in out_dir was built are linked
    from it instead of rendered again."""
    started = time.perf_counter()
    store_path, out_dir = Path(store_path), Path(os.path.abspath(out_dir))  # abspath: "." has no name
    check_target(out_dir)
    con = open_store(store_path)
    try:
        catalog = read_catalog(con)
        plan = plan_site(catalog)
        mapped = read_layouts(con)
        pages = {_key(plan.layers[job.layer_index]): [job.folder, job.neighbours, job.model_anchor]
                 for job in plan.jobs if job.shard is None}
        fingerprints = layer_fingerprints(con, catalog, pages)
    finally:
        con.close()
    state = BuildState(generator_fingerprint(full_paths))
    previous = BuildState.read(out_dir) if incremental and is_site(out_dir) else None
    reused = {i for i, layer in enumerate(plan.layers)
              if previous is not None and previous.generator == state.generator
              and previous.layers.get(_key(layer), {}).get("fingerprint") == fingerprints[_key(layer)]
              and previous.layers[_key(layer)]["folder"] == layer["path"]}
    jobs = [job for job in plan.jobs if job.layer_index not in reused]
    bos_tokens = {model: catalog.bos_token(model) for model in catalog.models()}
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if not _can_spawn():
        workers = 1

    staging = staging_dir(out_dir)
    try:
        static = copy_static(staging)
        env = make_environment(full_paths)
        env.globals["maps"] = map_links(plan, mapped)  # the index links each layer's map page
        files, size = 2 + len(static), write_index(catalog, plan, env.get_template("index.html"), staging)
        size += sum(path.stat().st_size for path in static)
        size += write_page(env.get_template("search.html"), staging / "search.html")
        index, units = SearchIndex(), 0
        for i, layer in enumerate(plan.layers):
            key = _key(layer)
            if i in reused:
                assert previous is not None
                state.layers[key] = previous.layers[key]
                index.add(i, previous.postings(key))
                linked_files, linked_bytes = link_tree(out_dir / layer["path"], staging / layer["path"], out_dir)
                files, size = files + linked_files, size + linked_bytes
            else:
                state.add(key, layer["path"], fingerprints[key], Postings())
        rendered = sum(layer["n"] for i, layer in enumerate(plan.layers) if i not in reused)
        with tqdm(total=rendered, unit="unit", disable=not progress, desc="site", dynamic_ncols=True) as bar:
            # closing(): on an error the pool is shut down before the staging folder is removed
            with closing(_run_jobs(jobs, store_path, staging, bos_tokens, workers, full_paths,
                                   plan.layers)) as results:
                try:
                    for result in results:
                        files, size, units = files + result.files, size + result.bytes, units + result.units
                        if result.postings is not None:
                            index.add(result.layer_index, result.postings)
                            layer = plan.layers[result.layer_index]
                            state.add(_key(layer), layer["path"], fingerprints[_key(layer)], result.postings)
                        bar.update(result.units)
                except BrokenProcessPool as err:
                    raise SiteError(f"{out_dir}: a build process died (out of memory?); nothing was written; "
                                    "try again with fewer workers") from err
        with closing(open_store(store_path)) as con:  # after the layers' folders, reused ones too, are in place
            map_files, map_bytes = write_maps(con, plan, env, staging)
        files, size = files + map_files, size + map_bytes
        index_files, index_bytes = index.write(staging, plan.layers, plan.n_units)
        files, size = files + index_files + 1, size + index_bytes + state.write(staging)
        write_marker(staging, store_path if full_paths else Path(store_path.name))
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BuildSummary(files=files, bytes=size, units=units, seconds=time.perf_counter() - started,
                        index=out_dir / "index.html", reused_units=plan.n_units - rendered)


def _key(layer: dict) -> tuple[str, str, int]:
    return (layer["model"], layer["source"], layer["layer"])
