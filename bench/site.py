"""Site build cost at harvest scale: time, files and bytes of `featureatlas build` on a synthetic store.

    python bench/site.py [--units 100000] [--seed 0] [--workers N] [--store PATH] [--keep DIR]

Generates a store shaped like a real harvest's (tests/synthetic_store.py, make_large_store: MLP neurons, signed
residual dimensions and a 16,384-feature SAE at 100,000 units, the CLI's default examples over shared 64-token
contexts) in a temporary folder, or uses --store PATH (generated there first when missing, so later runs skip
that step). Then it builds the site with build_site (in a temporary folder unless --keep DIR) and prints the
build's time and rate, the site's files, folders and bytes, its largest file, and whether it fits the free
static hosts' limits. It relies only on build_site's signature and the folder it writes, so it measures
whatever the builder is. The temporary folder is removed whatever happens (and that is timed).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:  # the generator lives with the tests, which use it too
    sys.path.insert(0, str(ROOT / "tests"))

from featureatlas.build.site import build_site  # noqa: E402
from featureatlas.store.schema import open_store  # noqa: E402

from helpers.synthetic_store import LargeStoreSummary, make_large_store  # noqa: E402

GB = 1_000_000_000  # hosts state "1 GB"; the decimal reading is the stricter one
MIB = 1 << 20


@dataclass(frozen=True)
class Host:
    """A static host's published-site limits (None: no such limit)."""

    name: str
    max_bytes: int | None = None
    max_files: int | None = None
    max_entries: int | None = None  # files and folders together
    max_file_bytes: int | None = None

    def problems(self, site: SiteSize) -> list[str]:
        """Why the site does not fit (empty when it does)."""
        checks = [(self.max_bytes, site.bytes, "bytes"), (self.max_files, site.files, "files"),
                  (self.max_entries, site.files + site.folders, "files and folders"),
                  (self.max_file_bytes, site.largest_bytes, "bytes in its largest file")]
        return [f"{value:,} {what} > {limit:,}" for limit, value, what in checks
                if limit is not None and value > limit]

    def limits(self) -> str:
        parts = [f"<= {self.max_bytes / GB:g} GB" if self.max_bytes else "",
                 f"<= {self.max_files:,} files" if self.max_files else "",
                 f"<= {self.max_entries:,} files and folders" if self.max_entries else "",
                 f"each file <= {self.max_file_bytes / MIB:g} MiB" if self.max_file_bytes else ""]
        return ", ".join(p for p in parts if p)


HOSTS = [
    Host("GitHub Pages", max_bytes=GB),  # "Published GitHub Pages sites may be no larger than 1 GB"
    Host("Cloudflare Pages free", max_files=20_000, max_file_bytes=25 * MIB),
    Host("GitLab Pages", max_bytes=GB, max_entries=200_000),  # gitlab.com: entries include directories
]


@dataclass(frozen=True)
class SiteSize:
    """What a built site folder holds."""

    files: int
    folders: int
    bytes: int  # apparent sizes, what hosts count
    disk_bytes: int  # allocated blocks: what it costs on this file system
    largest: str  # relative path
    largest_bytes: int


@dataclass(frozen=True)
class SiteBench:
    """One bench run's results (main returns it, for the smoke test)."""

    units: int
    store_seconds: float | None  # None when an existing store was used
    store_bytes: int
    build_seconds: float
    build_cpu_seconds: float  # this process and its build workers: less skewed than wall time on a busy machine
    site: SiteSize
    fits: dict[str, list[str]]  # host name -> problems (empty: fits)

    @property
    def units_per_second(self) -> float:
        return self.units / self.build_seconds if self.build_seconds > 0 else 0.0


def measure_site(site: Path) -> SiteSize:
    """Walk the folder once (os.scandir: no stat call beyond the one per file)."""
    files = folders = total = disk = largest_bytes = 0
    largest = ""
    stack = [site]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders += 1
                    stack.append(Path(entry.path))
                    continue
                info = entry.stat(follow_symlinks=False)
                files += 1
                total += info.st_size
                disk += info.st_blocks * 512
                if info.st_size > largest_bytes:
                    largest_bytes, largest = info.st_size, os.path.relpath(entry.path, site)
    return SiteSize(files, folders, total, disk, largest, largest_bytes)


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _load() -> str:
    """The 1-minute load average: a shared machine's other work shows up in the timings."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown"


def _cpu_seconds() -> float:
    """User + system time of this process and of its finished children (the build's worker processes)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _count_units(store: Path) -> int:
    con = open_store(store)
    try:
        return con.execute("SELECT count(*) FROM units").fetchone()[0]
    finally:
        con.close()


def _describe(summary: LargeStoreSummary) -> str:
    sources = ", ".join(f"{name} {n:,} in {summary.layers[name]} layer{'s' * (summary.layers[name] > 1)}"
                        for name, n in summary.units.items())
    examples = ", ".join(f"{n:,} {kind}" for kind, n in summary.examples.items())
    return (f"{sources}; examples: {examples}; dead SAE features: {summary.dead_features:,}; {summary.contexts:,} "
            f"contexts, {summary.vocabulary:,} tokens named by logit effects")


def run(units: int, seed: int, workers: int | None, store: Path | None, keep: Path | None,
        progress: bool) -> SiteBench:
    """Generate (or reuse) the store, build, measure, print; the temporary folder goes whatever happens (timed:
    removing a site of 100,000 files takes a while too)."""
    tmp = Path(tempfile.mkdtemp(prefix="featureatlas-bench-site-"))
    try:
        result = _run_in(tmp, units, seed, workers, store, keep, progress)
    finally:
        started = time.perf_counter()
        shutil.rmtree(tmp, ignore_errors=True)
        if tmp.exists():
            print(f"warning: could not remove all of {tmp}", file=sys.stderr)
    print(f"cleanup: {time.perf_counter() - started:.1f} s to remove the temporary folder")
    return result


def _run_in(tmp: Path, units: int, seed: int, workers: int | None, store: Path | None, keep: Path | None,
            progress: bool) -> SiteBench:
    store_seconds = None
    if store is None or not store.exists():
        store = store or tmp / "store.duckdb"
        cpu = _cpu_seconds()
        summary = make_large_store(store, units, seed)
        store_seconds = summary.seconds
        print(f"store: generated in {store_seconds:.1f} s (CPU time {_cpu_seconds() - cpu:.1f} s; load average "
              f"{_load()}): {_describe(summary)}")
    else:
        print(f"store: reusing {store} (--units and --seed do not apply)")
    store_bytes = store.stat().st_size
    n_units = _count_units(store)
    print(f"store: {n_units:,} units, {_size(store_bytes)}")
    out = keep or tmp / "site"
    load, cpu = _load(), _cpu_seconds()
    started = time.perf_counter()
    build_site(store, out, workers=workers, progress=progress)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    print(f"machine: {os.cpu_count()} CPUs, load average {load} before the build, {_load()} after "
          "(other processes skew the timing)")
    site = measure_site(out)
    fits = {host.name: host.problems(site) for host in HOSTS}
    result = SiteBench(n_units, store_seconds, store_bytes, seconds, cpu, site, fits)
    _report(result, workers, out if keep else None)
    return result


def _report(r: SiteBench, workers: int | None, kept: Path | None) -> None:
    s = r.site
    print(f"build: {r.units:,} units in {r.build_seconds:.1f} s = {r.units_per_second:,.0f} units/s "
          f"(workers: {workers or f'default, {os.cpu_count()} CPUs'}; CPU time {r.build_cpu_seconds:.1f} s)")
    print(f"site: {s.files:,} files in {s.folders:,} folders, {_size(s.bytes)} ({s.bytes:,} bytes; "
          f"{_size(s.disk_bytes)} on disk) = {s.bytes / max(r.units, 1):,.0f} bytes per unit, "
          f"{100 * s.files / max(r.units, 1):,.1f} files per 100 units")
    print(f"largest file: {s.largest} ({_size(s.largest_bytes)})")
    for host in HOSTS:
        problems = r.fits[host.name]
        print(f"fits {host.name} ({host.limits()}): {'no: ' + '; '.join(problems) if problems else 'yes'}")
    if kept is not None:
        print(f"site kept in {kept}")


def main(argv: list[str] | None = None) -> SiteBench:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=100_000, help="units of the generated store (default 100,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="build processes (default: build_site's)")
    ap.add_argument("--store", type=Path, default=None,
                    help="use this store; generated there first (and kept) when it does not exist")
    ap.add_argument("--keep", type=Path, default=None, help="build the site here and keep it")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                    help="the build's progress bar (default: when stderr is a terminal)")
    args = ap.parse_args(argv)
    return run(args.units, args.seed, args.workers, args.store, args.keep, args.progress)


if __name__ == "__main__":
    main()
