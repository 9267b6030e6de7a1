"""`featureatlas export`: a store's units as files other tools read, written into a folder that appears whole.

Two formats share this module's plumbing (which layers, where, atomically, with a progress bar):
`json` (export_json.py: one self-describing file per unit, plus index.json) and `neuronpedia`
(export_neuronpedia.py: the batch layout Neuronpedia imports). Both read the store only through its public views
and have DuckDB render the JSON text in bulk, a chunk of units per query, so Python only moves finished strings
to disk. Chunks run in parallel threads, each on its own cursor (a chunk's query keeps about one core busy, and
DuckDB releases the GIL while it runs), and each thread writes its own chunk's files.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
from tqdm import tqdm

from featureatlas.atomic import remove_stale_temps, replace_folder, staging_dir
from featureatlas.errors import UsageError, setting_name
from featureatlas.slugs import unique_slugs
from featureatlas.store.schema import StoreError, open_store
from featureatlas.text import visible

FORMATS = ("json", "neuronpedia")
MARKER = ".featureatlas-export"  # lets --overwrite tell a previous export from a folder it must not delete
CHUNK_UNITS = 2048  # at most this many units per bulk query
CHUNK_BYTES = 24_000_000  # and about this much JSON text: memory per thread stays at a few hundred MB
MAX_WORKERS = 8


@dataclass(frozen=True)
class LayerRef:
    """One (model, source, layer) to export, with its `sources` row (None fields where the store has none)."""

    model: str
    source: str
    layer: int
    n_units: int
    model_slug: str
    source_slug: str
    info: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote, for the CLI to report."""

    format: str
    units: int
    files: int
    bytes: int
    seconds: float
    out: Path

    @property
    def units_per_second(self) -> float:
        return self.units / self.seconds if self.seconds > 0 else 0.0


# --- SQL fragments: JSON text rendered by DuckDB ------------------------------------------------------------------


def sql_number(expr: str) -> str:
    """JSON text of a FLOAT or DOUBLE expression: DuckDB's shortest form that reads back as the same value in the
    column's own precision (a FLOAT 0.3 is `0.3`, not `0.30000001192092896`); null for NULL, NaN and infinities,
    which JSON cannot hold."""
    return f"(CASE WHEN isfinite({expr}) THEN CAST({expr} AS VARCHAR) ELSE 'null' END)"


def sql_numbers(list_expr: str) -> str:
    """JSON array text of a FLOAT[] / DOUBLE[] expression, element by element as sql_number."""
    return f"('[' || array_to_string([{sql_number('v_')} FOR v_ IN {list_expr}], ',') || ']')"


def sql_json(expr: str) -> str:
    """JSON text of any value (strings escaped by DuckDB's JSON writer, exactly as stored); null for NULL."""
    return f"coalesce(CAST(to_json({expr}) AS VARCHAR), 'null')"


def sql_int(expr: str) -> str:
    """JSON text of an integer expression; null for NULL (a NULL would otherwise make the whole row NULL)."""
    return f"coalesce(CAST({expr} AS VARCHAR), 'null')"


def in_chunk(alias: str = "") -> str:
    """The WHERE clause of one chunk of a layer; parameters $1..$5 are model, source, layer, first and last unit."""
    a = f"{alias}." if alias else ""
    return f"{a}model = $1 AND {a}source = $2 AND {a}layer = $3 AND {a}unit BETWEEN $4 AND $5"


EXAMPLE_ORDER = ("CASE {a}example_kind WHEN 'top' THEN 0 WHEN 'bottom' THEN 1 WHEN 'quantile' THEN 2 "
                 "WHEN 'random' THEN 3 ELSE 4 END, {a}interval_hi DESC NULLS LAST, {a}interval_lo DESC NULLS LAST, "
                 "{a}rank")


def has_view(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Whether the store has a view (or table) of this name: newer views are optional in older stores."""
    return con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0] > 0


def explanation_columns(con: duckdb.DuckDBPyConnection) -> dict[str, str] | None:
    """SQL for text, score, score_kind and author of the `explanations` view, or None when the store has no such
    view (it came after the first version-2 stores: no view, no explanations); a missing optional column reads as
    null."""
    if not has_view(con, "explanations"):
        return None
    columns = {row[0] for row in con.execute("DESCRIBE explanations").fetchall()}
    missing = {"model", "source", "layer", "unit", "text"} - columns
    if missing:
        raise StoreError(f"the store's explanations view lacks the column(s) {', '.join(sorted(missing))}; "
                         "harvest or annotate it again with this featureatlas")
    return {"text": "CAST(x.text AS VARCHAR)",
            "score": "TRY_CAST(x.score AS DOUBLE)" if "score" in columns else "NULL::DOUBLE",
            "score_kind": "CAST(x.score_kind AS VARCHAR)" if "score_kind" in columns else "NULL::VARCHAR",
            "author": "CAST(x.author AS VARCHAR)" if "author" in columns else "NULL::VARCHAR"}


# --- which layers ----------------------------------------------------------------------------------------------------


def parse_layer_spec(spec: str) -> set[int]:
    """'0,3-5' -> {0, 3, 4, 5}; refuses anything else with a line saying what a layer list looks like."""
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise UsageError(f"{setting_name('layers')} {spec!r}: {part!r} is not a layer number or a range "
                             f"like 3-5") from None
        if first < 0 or last < first:
            raise UsageError(f"{setting_name('layers')} {spec!r}: {part!r} is not a range of layers (first <= "
                             f"last, both >= 0)")
        layers.update(range(first, last + 1))
    return layers


def _ranges(numbers: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[str] = []
    for n in sorted(set(numbers)):
        if out and out[-1][1] == n - 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in out)


def select_layers(con: duckdb.DuckDBPyConnection, sources: list[str] | None,
                  layers: str | None) -> list[LayerRef]:
    """The (model, source, layer)s to export, in model, source, layer order; slugs are those of the whole store
    (the same as the site's), so filtering never renames a folder."""
    rows = con.execute("""
        WITH u AS (SELECT model, source, layer, count(*) AS n_units FROM units GROUP BY ALL)
        SELECT model, source, layer, coalesce(u.n_units, 0) AS n_units, s.* EXCLUDE (model, source, layer, n_units)
        FROM sources s FULL OUTER JOIN u USING (model, source, layer)
        ORDER BY model, source, layer""").fetchall()
    names = [d[0] for d in con.description]
    records = [dict(zip(names, row, strict=True)) for row in rows]
    model_slugs = unique_slugs(sorted({r["model"] for r in records}))
    source_slugs = {model: unique_slugs(sorted({r["source"] for r in records if r["model"] == model}))
                    for model in model_slugs}

    all_sources = sorted({r["source"] for r in records})
    if sources:
        unknown = [s for s in sources if s not in all_sources]
        if unknown:
            have = ", ".join(visible(s) for s in all_sources) or "none"
            raise UsageError(f"{setting_name('sources')} {visible(unknown[0])!r}: the store has no such source; "
                             f"it has: {have}")
        records = [r for r in records if r["source"] in sources]
    if layers is not None and layers.strip() not in ("", "all"):
        wanted = parse_layer_spec(layers)
        present = {r["layer"] for r in records}
        absent = wanted - present
        if absent:
            raise UsageError(f"{setting_name('layers')} {layers!r}: layer(s) {_ranges(absent)} not in the store"
                             f"{' for these sources' if sources else ''}; it has layers {_ranges(present) or 'none'}")
        records = [r for r in records if r["layer"] in wanted]
    return [LayerRef(model=r["model"], source=r["source"], layer=int(r["layer"]), n_units=int(r["n_units"]),
                     model_slug=model_slugs[r["model"]], source_slug=source_slugs[r["model"]][r["source"]],
                     info={k: v for k, v in r.items() if k not in ("model", "source", "layer", "n_units")})
            for r in records]


# --- plain JSON values (for the small files: index, neuronpedia metadata) -------------------------------------------


def plain(value: Any) -> Any:
    """A store value as JSON can hold it: timestamps as ISO 8601, non-finite floats as null, JSON columns parsed."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def parse_json_column(text: str | None) -> Any:
    """A JSON column's value (DuckDB hands it over as text); the text itself if it is not valid JSON."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def dumps(value: Any) -> str:
    """Compact JSON, non-ASCII as is (UTF-8 files), nothing HTML-escaped: strings survive exactly."""
    return json.dumps(plain(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def read_runs(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The `runs` view as JSON-ready dicts (settings and versions parsed), oldest first per model."""
    cursor = con.execute("SELECT * FROM runs ORDER BY model, started_at, run_id")
    names = [d[0] for d in cursor.description]
    runs = []
    for row in cursor.fetchall():
        run = dict(zip(names, row, strict=True))
        for key in ("settings", "versions"):
            if isinstance(run.get(key), str):
                run[key] = parse_json_column(run[key])
        runs.append(plain(run))
    return runs


# --- writing ---------------------------------------------------------------------------------------------------------

Files = list[tuple[Path, bytes | Callable[[], bytes]]]  # content, or a function that makes it


@dataclass(frozen=True)
class Chunk:
    """Units of one layer rendered by one query: `units` ascending, `first` the position of units[0] among the
    layer's units (Neuronpedia numbers its batch files by it)."""

    ref: LayerRef
    units: list[int]
    first: int


def _write_files(files: Files) -> tuple[int, int]:
    size = 0
    for path, content in files:
        data = content() if callable(content) else content
        with open(path, "wb") as f:
            f.write(data)
        size += len(data)
    return len(files), size


# --- the output folder -----------------------------------------------------------------------------------------------


def check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output we must not replace or cannot write."""
    remove_stale_temps(out_dir)  # first: an earlier run's crash may have left the previous folder aside
    if out_dir.is_symlink():
        raise UsageError(f"{out_dir}: is a symbolic link; give the real folder or choose another {setting_name('out')}")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UsageError(f"{out_dir}: exists and is not a folder; choose another {setting_name('out')}")
        if not overwrite:
            raise UsageError(f"{out_dir}: already exists; pass {setting_name('overwrite')} to replace it, or "
                             f"choose another {setting_name('out')}")
        if any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
            raise UsageError(f"{out_dir}: is not empty and is not a featureatlas export, so "
                             f"{setting_name('overwrite')} will not "
                             f"delete it; choose another {setting_name('out')} or empty it first")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{out_dir}: cannot create folder {parent} ({err.strerror}); choose another "
                         f"{setting_name('out')}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{out_dir}: folder {parent} is not writable; choose another {setting_name('out')}")


@dataclass
class ExportContext:
    """What a format writer gets: the open store, the layers, the staging folder and options, and the means to
    write: `write` for a small file now, `run` for the chunks, in parallel."""

    con: duckdb.DuckDBPyConnection
    store_path: Path
    layers: list[LayerRef]
    root: Path
    bar: tqdm
    chunk_units: int = CHUNK_UNITS
    workers: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0

    def write(self, path: Path, content: bytes) -> None:
        """A small file, written now by the calling thread and counted."""
        self.files, self.bytes = self.files + 1, self.bytes + len(content)
        path.write_bytes(content)

    def chunks(self, ref: LayerRef, multiple: int = 1) -> list[Chunk]:
        """The layer's units (those the `units` view has) in ascending runs of about CHUNK_BYTES of output, at most
        chunk_units, a multiple of `multiple` units each (but the last)."""
        units = [row[0] for row in self.con.execute(
            "SELECT unit FROM units WHERE model = ? AND source = ? AND layer = ? ORDER BY unit",
            [ref.model, ref.source, ref.layer]).fetchall()]
        n_examples, tokens = self.con.execute(
            "SELECT count(*), coalesce(max(context_length), 0) FROM examples, "  # every run records its context length
            "(SELECT max(context_length) AS context_length FROM runs WHERE model = $1) "
            "WHERE model = $1 AND source = $2 AND layer = $3", [ref.model, ref.source, ref.layer]).fetchone()
        per_unit = 2_000 + n_examples / max(len(units), 1) * (300 + 24 * tokens)  # bytes, roughly
        size = min(self.chunk_units, max(16, int(CHUNK_BYTES // per_unit)))
        size = max(multiple, size // multiple * multiple)
        return [Chunk(ref, units[first:first + size], first) for first in range(0, len(units), size)]

    def run(self, chunks: list[Chunk], render: Callable[[duckdb.DuckDBPyConnection, Chunk], Files]) -> None:
        """render(cursor, chunk) -> files for every chunk, in `workers` threads that each write their own files;
        on an error the chunks not started are cancelled and the error raised."""
        cursors: queue.SimpleQueue[duckdb.DuckDBPyConnection] = queue.SimpleQueue()
        opened = [self.con.cursor() for _ in range(min(self.workers, len(chunks)))]
        for cursor in opened:
            cursors.put(cursor)

        def task(chunk: Chunk) -> tuple[int, int]:
            cursor = cursors.get()
            try:
                return _write_files(render(cursor, chunk))
            finally:
                cursors.put(cursor)

        pool = ThreadPoolExecutor(max(1, len(opened)), thread_name_prefix="export")
        try:
            futures = {pool.submit(task, chunk): len(chunk.units) for chunk in chunks}
            for future in as_completed(futures):
                n_files, n_bytes = future.result()
                self.files, self.bytes = self.files + n_files, self.bytes + n_bytes
                self.bar.update(futures[future])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # nothing writes into the staging folder afterwards
            for cursor in opened:
                cursor.close()


def export_store(store_path: Path, out_dir: Path, fmt: str = "json", sources: list[str] | None = None,
                 layers: str | None = None, overwrite: bool = False, progress: bool = True,
                 workers: int | None = None, chunk_units: int = CHUNK_UNITS, **options: Any) -> ExportSummary:
    """Export the chosen layers of a store into out_dir, which appears (or is replaced) only when complete.

    `workers`: threads (default: the cores, at most MAX_WORKERS). `options` are the format's own (neuronpedia:
    model_id, set_name, creator_id, batch_size)."""
    started = time.perf_counter()
    if fmt not in FORMATS:
        raise UsageError(f"{setting_name('fmt')} {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "json":
        from featureatlas.export.json_files import write_json as write
        unexpected = [name for name, value in options.items() if value is not None]
        if unexpected:
            raise UsageError(f"{setting_name(unexpected[0])} applies to {setting_name('fmt')} neuronpedia only")
    else:
        from featureatlas.export.neuronpedia import check_options
        from featureatlas.export.neuronpedia import write_neuronpedia as write
    if workers is not None and workers < 1:
        raise UsageError(f"{setting_name('workers')} {workers}: give at least 1")
    workers = workers or min(os.cpu_count() or 1, MAX_WORKERS)
    store_path, out_dir = Path(store_path), Path(os.path.abspath(out_dir))  # abspath: "." has no name
    con = open_store(store_path)
    try:
        refs = select_layers(con, sources, layers)
        if fmt == "neuronpedia":
            options = check_options(refs, options)
        check_target(out_dir, overwrite)
        staging = staging_dir(out_dir)  # the site's: same place, same cleanup of killed runs
        total = sum(ref.n_units for ref in refs)
        try:
            with tqdm(total=total, unit="unit", disable=not progress, desc=f"export {fmt}", dynamic_ncols=True) as bar:
                ctx = ExportContext(con, store_path, refs, staging, bar, chunk_units, workers, options)
                write(ctx)
            info = {"generator": "featureatlas", "format": fmt, "store": store_path.name,
                    "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            (staging / MARKER).write_text(dumps(info) + "\n")
            check_target(out_dir, overwrite)  # again: it may have appeared or changed while we worked
            replace_folder(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        con.close()
    return ExportSummary(format=fmt, units=total, files=ctx.files, bytes=ctx.bytes,
                         seconds=time.perf_counter() - started, out=out_dir)
