"""`featureatlas annotate`: load explanations of units into a store's `explanations`, all or nothing, without
duplicates. Inputs: our own .csv/.tsv and .jsonl/.json rows, the per-latent files EleutherAI's delphi writes, and
Neuronpedia's explanation exports. Everything read is untrusted: a bad row stops the load with one line naming the
file, the line (or row) and what to do; the text itself is stored verbatim, for the site to escape. Files are
streamed (gzip decompressed as read): .jsonl and .csv a line at a time, each line (or CSV row) capped in bytes and
in values; what must be parsed whole (.json, delphi's files) only up to MAX_DOCUMENT_BYTES and MAX_DOCUMENT_VALUES.
So a huge line or a decompression bomb stops with one line, and parsing any one line or document holds at
most about 500 MB."""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
import reprlib
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import duckdb
import pyarrow as pa

from featureatlas.errors import AnnotationError, setting_name
from featureatlas.store.addresses import (
    MODEL_SEPARATOR,
    AddressError,
    SourceLayer,
    UnknownUnitError,
    describe_sources,
    parse_address,
    resolve_unit,
)
from featureatlas.store.schema import StoreError, ensure_explanations, open_store_for_update

MAX_TEXT = 20_000  # characters of one explanation; more is not an explanation but a pasted document
MAX_NAME = 200  # characters of an author or score kind
MAX_INT = 2**31 - 1  # the largest layer or unit number a store can hold
TEXT_KEYS = ("text", "explanation", "description")
UNIT_KEYS = ("unit", "index", "feature", "latent")
SCORE_KIND_KEYS = ("score_kind", "method")
# delphi writes one file per latent, `<module>_latent<index>.txt`, holding the explanation as a JSON string, and
# this string where its explainer's answer could not be parsed (not an explanation: skipped).
DELPHI_FILE = re.compile(r"(?P<module>.+)_latent(?P<latent>\d+)\.txt")
DELPHI_PLACEHOLDER = "Explanation could not be parsed."
DELPHI_SCORERS = ("detection", "fuzz")  # preferred, in order, when a latent was scored several ways
NEURONPEDIA_LAYER = re.compile(r"(?P<layer>\d+)(?:-(?P<set>.+))?")
ROW_FILES = re.compile(r".*\.(?:jsonl|ndjson|json|csv|tsv)(?:\.gz)?", re.IGNORECASE)
# Explanation files are untrusted: what one of them can make annotate hold is capped (sizes after decompression).
MAX_LINE_BYTES = 16 * 2**20  # of a line of .jsonl or .csv (or a CSV row spanning lines); read a line at a time
MAX_LINE_VALUES = 1_000_000  # JSON values or CSV fields in a line (or row): what parsing one builds stays ~100 MB
MAX_DOCUMENT_BYTES = 64 * 2**20  # of what is parsed whole: a .json file, a delphi file
MAX_DOCUMENT_VALUES = 3_000_000  # JSON values in what is parsed whole: json.loads builds at most ~300 MB
_REPR = reprlib.Repr()  # for values quoted in messages: cut short however big or deeply nested
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 40, 40, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 3


@dataclass
class Record:
    """One explanation as read, before its unit is looked up in the store. A unit is named either by an address
    (our syntax), or by columns (model/source/layer/unit), or by a delphi module or Neuronpedia source id
    (`foreign`), which is mapped onto a source of the store."""

    where: str
    text: str
    score: float | None = None
    score_kind: str | None = None
    author: str | None = None
    address: str | None = None
    model: str | None = None
    source: str | None = None
    layer: int | None = None
    unit: int | None = None
    foreign: str | None = None
    foreign_kind: str | None = None  # 'delphi' | 'neuronpedia'
    foreign_set: str | None = None  # Neuronpedia: the set part of '12-res-jb'
    foreign_model: str | None = None


@dataclass(frozen=True)
class StoreSource:
    """A (model, source, layer) of the store with what maps foreign names onto it."""

    model: str
    source: str
    layer: int
    n_units: int
    kind: str
    hook_name: str
    neuronpedia_id: str | None


@dataclass
class AnnotateSummary:
    """What a load did, for the one-line report."""

    store: Path
    file: str
    read: int = 0
    added: int = 0
    units: int = 0
    duplicates: int = 0
    unknown: int = 0
    first_unknown: str | None = None
    placeholders: int = 0
    replaced: int = 0

    def line(self) -> str:
        parts = [f"added {self.added:,} explanation{'s' * (self.added != 1)} of {self.units:,} "
                 f"unit{'s' * (self.units != 1)} from {self.file} to {self.store}"]
        if self.replaced:
            parts.append(f"replaced {self.replaced:,} loaded earlier from {self.file}")
        if self.duplicates:
            parts.append(f"{self.duplicates:,} already there")
        if self.unknown:
            parts.append(f"skipped {self.unknown:,} for units not in the store (the first: {self.first_unknown})")
        if self.placeholders:
            parts.append(f"skipped {self.placeholders:,} delphi files saying {DELPHI_PLACEHOLDER!r}")
        return "; ".join(parts)


def annotate(store: str | Path, explanations: str | Path, *, author: str | None = None,
             sources: Sequence[str] = (), model: str | None = None, replace: bool = False,
             skip_unknown: bool = False) -> AnnotateSummary:
    """Load `explanations` (a file, or a delphi or Neuronpedia folder) into `store` in one transaction.

    `sources`: `SOURCE` (the source of every row that names none) and/or `NAME=SOURCE` (maps a delphi module, a
    Neuronpedia source id or set name, or a source column's value onto a source of the store). `author` replaces
    every row's author. `replace` first deletes what was loaded earlier from a file of the same name. A row
    identical (model, source, layer, unit, text, author, score_kind) to one already stored, or to an earlier row,
    is skipped."""
    store, explanations = Path(store), Path(explanations)
    if not explanations.exists():
        raise AnnotationError(f"{explanations}: no such file or folder; pass a .csv, .jsonl or .json file, a "
                              "Neuronpedia export, or a delphi explanations folder")
    if author is not None and (not author.strip() or len(author) > MAX_NAME):
        raise AnnotationError(f"{setting_name('author')} {author[:MAX_NAME]!r}: give a name of 1 to {MAX_NAME} "
                              f"characters")
    con = open_store_for_update(store)
    try:
        summary = AnnotateSummary(store=store, file=_file_name(explanations))
        context = _Context(_store_sources(con), store)
        context.set_options(sources, model)
        rows: list[tuple[str, str, int, int, str, float | None, str | None, str | None]] = []
        seen: set[tuple] = set()
        for record in read_explanations(explanations, summary):
            summary.read += 1
            if author is not None:
                record.author = author.strip()
            try:
                unit = context.locate(record)
            except UnknownUnitError as err:
                if not skip_unknown:
                    raise AnnotationError(f"{record.where}: {err}; fix it, or pass "
                                          f"{setting_name('skip_unknown')} to leave out "
                                          "rows of units the store does not hold") from None
                summary.unknown += 1
                summary.first_unknown = summary.first_unknown or record.where
                continue
            except AddressError as err:
                raise AnnotationError(f"{record.where}: {err}") from None
            key = (*unit, record.text, record.author, record.score_kind)
            if key in seen:
                summary.duplicates += 1
                continue
            seen.add(key)
            rows.append((*unit, record.text, record.score, record.score_kind, record.author))
        if summary.read == 0 and summary.placeholders == 0:
            raise AnnotationError(f"{explanations}: holds no explanations; nothing to add")
        _write(con, rows, summary, replace)
    finally:
        con.close()
    return summary


def add_records(store: str | Path, records: Iterable[Record], file: str) -> AnnotateSummary:
    """Add explanations a program made (`featureatlas explain`), each naming its unit by model, source, layer
    and unit, checked as a file's rows are, in one transaction, skipping rows already stored; `file` is what the
    `file` column records."""
    store = Path(store)
    con = open_store_for_update(store)
    try:
        summary = AnnotateSummary(store=store, file=file)
        context = _Context(_store_sources(con), store)
        rows, seen = [], set()
        for record in records:
            summary.read += 1
            try:
                unit = context.locate(record)
            except AddressError as err:
                raise AnnotationError(f"{record.where}: {err}") from None
            text = _text(record.where, {"text": record.text})
            score = _score(record.where, record.score)
            kind, author = (_name(record.where, what, getattr(record, what)) for what in ("score_kind", "author"))
            key = (*unit, text, author, kind)
            if key in seen:
                summary.duplicates += 1
                continue
            seen.add(key)
            rows.append((*unit, text, score, kind, author))
        _write(con, rows, summary, replace=False)
    finally:
        con.close()
    return summary


def read_explanations(path: Path, summary: AnnotateSummary | None = None) -> Iterator[Record]:
    """Every explanation in a file or folder, in order; the format comes from the name and the content."""
    if path.is_dir():
        yield from _read_folder(path, summary)
    else:
        yield from _read_file(path, summary)


# ---- writing -------------------------------------------------------------------------------------------------

def _write(con: duckdb.DuckDBPyConnection, rows: list[tuple], summary: AnnotateSummary, replace: bool) -> None:
    """All rows in one transaction, less those already stored; nothing changes if anything fails."""
    columns = list(zip(*rows, strict=True)) if rows else [[]] * 8
    incoming = pa.table({
        "model": pa.array(columns[0], pa.string()), "source": pa.array(columns[1], pa.string()),
        "layer": pa.array(columns[2], pa.int32()), "unit": pa.array(columns[3], pa.int32()),
        "text": pa.array(columns[4], pa.string()), "score": pa.array(columns[5], pa.float64()),
        "score_kind": pa.array(columns[6], pa.string()), "author": pa.array(columns[7], pa.string())})
    fresh = ("SELECT * FROM incoming i WHERE NOT EXISTS (SELECT 1 FROM t_explanations e WHERE e.model = i.model "
             "AND e.source = i.source AND e.layer = i.layer AND e.unit = i.unit AND e.text = i.text "
             "AND e.author IS NOT DISTINCT FROM i.author AND e.score_kind IS NOT DISTINCT FROM i.score_kind)")
    con.register("incoming", incoming)  # registered: replacement scans are off with external access
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            ensure_explanations(con)
            if replace:
                summary.replaced = con.execute("SELECT count(*) FROM t_explanations WHERE file = ?",
                                               [summary.file]).fetchone()[0]
                con.execute("DELETE FROM t_explanations WHERE file = ?", [summary.file])
            summary.added, summary.units = con.execute(
                f"SELECT count(*), count(DISTINCT (model, source, layer, unit)) FROM ({fresh})").fetchone()
            con.execute("INSERT INTO t_explanations (model, source, layer, unit, text, score, score_kind, author, "
                        f"file, added_at) SELECT model, source, layer, unit, text, score, score_kind, author, ?, ? "
                        f"FROM ({fresh})", [summary.file, datetime.now(timezone.utc).replace(tzinfo=None)])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    except duckdb.Error as err:
        raise StoreError(f"{summary.store}: could not add the explanations ({str(err).splitlines()[0]}); "
                         "the store is unchanged") from None
    summary.duplicates += len(rows) - summary.added


def _file_name(path: Path) -> str:
    """What the `file` column records, and --replace matches: the name, with the run's name for a delphi folder
    called `explanations` (delphi's layout is results/RUN/explanations)."""
    path = path.resolve()
    if path.is_dir() and (path / "explanations").is_dir():
        return f"{path.name}/explanations"  # a delphi run folder: the same name as its explanations folder
    if path.is_dir() and path.name == "explanations" and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


# ---- finding each row's unit ---------------------------------------------------------------------------------

def _store_sources(con: duckdb.DuckDBPyConnection) -> list[StoreSource]:
    found = []
    for model, source, layer, n_units, kind, hook_name, config in con.execute(
            "SELECT model, source, layer, n_units, kind, hook_name, config FROM sources "
            "ORDER BY model, source, layer").fetchall():
        found.append(StoreSource(model, source, layer, n_units, kind, hook_name, _neuronpedia_id(config)))
    return found


def _neuronpedia_id(config: str | None) -> str | None:
    """SAELens configs name the dictionary's Neuronpedia source, e.g. 'gpt2-small/0-res-jb' (6.x in metadata)."""
    try:
        parsed = json.loads(config) if config else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    metadata = parsed.get("metadata")
    found = parsed.get("neuronpedia_id") or (metadata.get("neuronpedia_id") if isinstance(metadata, dict) else None)
    return found if isinstance(found, str) else None


def _module_key(module: str) -> str:
    """A module path without the wrapper prefixes that differ between tools ('model.layers.5' ~ 'layers.5')."""
    module = module.strip()
    for prefix in ("base_model.model.", "model.", "gpt_neox.", "transformer."):
        if module.startswith(prefix):
            module = module[len(prefix):]
    return module


def _module_layer(module: str) -> int | None:
    """The layer a module path names: layers.5, h.5, blocks.5, layer_5 ..."""
    match = (re.search(r"(?:^|\.)(?:layers|layer|h|blocks|block)[._](\d+)(?:\.|$)", module)
             or re.search(r"(?:^|\.)(\d+)(?:\.|$)", module))
    return int(match.group(1)) if match else None


class _Context:
    """The store's sources and the --source/--model options, which together say where each record goes."""

    def __init__(self, sources: list[StoreSource], store: Path):
        self.sources = sources
        self.table = [SourceLayer(s.model, s.source, s.layer, s.n_units) for s in sources]
        self.store = store
        self.models = sorted({s.model for s in sources})
        self.default_source: str | None = None
        self.source_map: dict[str, str] = {}
        self.model: str | None = None

    def set_options(self, sources: Sequence[str], model: str | None) -> None:
        known = {s.source for s in self.sources}
        for value in sources:
            if value in known or "=" not in value:
                if value not in known:
                    raise AnnotationError(f"{setting_name('sources')} {value!r}: {self.store} has no such "
                                          f"source; it has "
                                          f"{describe_sources(self.table)}")
                if self.default_source not in (None, value):
                    raise AnnotationError(f"{setting_name('sources')} {value!r}: a default source "
                                          f"({self.default_source!r}) was "
                                          f"given already; map names with {setting_name('sources')} NAME=SOURCE")
                self.default_source = value
            else:
                name, _, target = value.rpartition("=")
                if target not in known:
                    raise AnnotationError(f"{setting_name('sources')} {value!r}: {self.store} has no source "
                                          f"{target!r}; it has "
                                          f"{describe_sources(self.table)}")
                self.source_map[name.strip()] = target
        if model is not None and model not in self.models:
            raise AnnotationError(f"{setting_name('model')} {model!r}: {self.store} holds no such model; it holds "
                                  f"{', '.join(repr(m) for m in self.models)}")
        self.model = model

    def locate(self, record: Record) -> tuple[str, str, int, int]:
        """(model, source, layer, unit) of a record; AddressError (or UnknownUnitError) when there is none."""
        if record.foreign is not None:
            return self._locate_foreign(record)
        if record.address is not None:
            address = record.address
            if self.model is not None and MODEL_SEPARATOR not in address:
                address = f"{self.model}{MODEL_SEPARATOR}{address.strip()}"
            return parse_address(address, self.table, default_source=self.default_source)
        source = self.source_map.get(record.source, record.source) if record.source is not None else None
        return resolve_unit(self.table, model=record.model or self.model, source=source, layer=record.layer,
                            unit=record.unit, default_source=self.default_source)

    def _match_model(self, name: str | None) -> str | None:
        """The store's model a tool's model id names, when it can be told (else None: resolve_unit decides)."""
        if self.model is not None or name is None:
            return self.model
        for model in self.models:
            if model == name or model.lower() == name.lower() or model.lower().rsplit("/", 1)[-1] == \
                    name.lower().rsplit("/", 1)[-1]:
                return model
        return None

    def _locate_foreign(self, record: Record) -> tuple[str, str, int, int]:
        model = self._match_model(record.foreign_model)
        names = [n for n in (record.foreign, record.foreign_set) if n]
        mapped = next((self.source_map[n] for n in names if n in self.source_map), None)
        source, layer = mapped or self.default_source, record.layer
        if source is None:
            candidates = [s for s in self.sources if (model is None or s.model == model) and self._matches(s, record)]
            if not candidates:
                kind = "delphi module" if record.foreign_kind == "delphi" else "Neuronpedia source"
                raise UnknownUnitError(
                    f"{kind} {_shown(record.foreign)} matches no source of the store (it has "
                    f"{describe_sources(self.table)}); say which with --source SOURCE or "
                    f"--source {_brief(record.foreign)}=SOURCE")
            if len({(s.model, s.source) for s in candidates}) == 1:
                model, source = candidates[0].model, candidates[0].source
                if layer is None or len(candidates) == 1:
                    layer = candidates[0].layer
            else:
                raise AddressError(f"{_shown(record.foreign)} matches several sources of the store: "
                                   f"{describe_sources([(s.model, s.source, s.layer) for s in candidates])}; say "
                                   f"which with --source {_brief(record.foreign)}=SOURCE (or --model)")
        return resolve_unit(self.table, model=model, source=source, layer=layer, unit=record.unit)

    @staticmethod
    def _matches(source: StoreSource, record: Record) -> bool:
        short = source.source.split(":", 1)[-1]
        if record.foreign_kind == "delphi":
            return source.kind in ("sae", "transcoder") and (
                _module_key(source.hook_name) == _module_key(record.foreign) or short == record.foreign)
        np_id = source.neuronpedia_id
        return (np_id is not None and np_id.rsplit("/", 1)[-1] == record.foreign
                or short in (record.foreign, record.foreign_set) and source.layer == record.layer)


# ---- reading -------------------------------------------------------------------------------------------------

def _read_folder(path: Path, summary: AnnotateSummary | None) -> Iterator[Record]:
    """A delphi run folder or its explanations folder; else a folder of row files (Neuronpedia's batch-N.jsonl.gz)."""
    folder = path / "explanations" if (path / "explanations").is_dir() else path
    try:
        delphi = sorted(((m["module"], int(m["latent"]), p) for p in folder.iterdir()
                         if (m := DELPHI_FILE.fullmatch(p.name)) and p.is_file()), key=lambda t: t[:2])
        batches = sorted(p for p in path.iterdir() if ROW_FILES.fullmatch(p.name) and p.is_file())
    except OSError as err:
        raise AnnotationError(f"{path}: cannot list the folder ({err.strerror}); check its permissions") from None
    if delphi:
        yield from _delphi_records(folder, delphi, summary)
    elif batches and folder == path:
        for batch in batches:
            yield from _read_file(batch, summary)
    else:
        raise AnnotationError(f"{path}: holds no delphi explanation files (MODULE_latentN.txt) and no .jsonl, "
                              ".json or .csv files; pass delphi's explanations folder (or its run folder) or a file")


def _read_file(path: Path, summary: AnnotateSummary | None) -> Iterator[Record]:
    name = path.name.lower()
    if DELPHI_FILE.fullmatch(path.name):
        yield from _delphi_records(path.parent, [(m["module"], int(m["latent"]), path)
                                                 for m in [DELPHI_FILE.fullmatch(path.name)]], summary)
        return
    base = name[:-3] if name.endswith(".gz") else name
    suffix = base.rsplit(".", 1)[-1] if "." in base else ""
    if suffix == "json" or suffix not in ("csv", "tsv", "jsonl", "ndjson") and _starts_json(path):
        yield from _json_records(path)
        return
    with _Lines(path) as lines:
        if suffix in ("jsonl", "ndjson"):
            yield from _jsonl_records(path, lines)
        else:
            delimiter = "\t" if suffix == "tsv" or suffix != "csv" and "\t" in lines.first() else ","
            yield from _csv_records(path, lines, delimiter)


def _starts_json(path: Path) -> bool:
    """Whether the text starts (after a byte-order mark and white space) with [ or {; read a chunk at a time."""
    with _open_bytes(path) as file:
        start = True
        while chunk := _guarded_read(path, lambda: file.read(1 << 16)):
            if start:
                chunk, start = chunk.removeprefix(b"\xef\xbb\xbf"), False
            chunk = chunk.lstrip(b" \t\r\n")
            if chunk:
                return chunk[:1] in (b"[", b"{")
    return False


class _TooLong(AnnotationError):
    """A line or CSV row over MAX_LINE_BYTES or MAX_LINE_VALUES."""


class _Lines:
    """A file's text, decompressed as it is read (.gz), one line at a time: never more than MAX_LINE_BYTES of a
    line, or of a CSV row spanning lines, is held, so a huge line or a decompression bomb stops with one line.
    Bad UTF-8 and damaged gzip data stop with one line naming the file and the place."""

    def __init__(self, path: Path) -> None:
        self.path, self.number, self.offset, self.row_bytes, self.row_values = path, 0, 0, 0, 0
        self.rows_span_lines = False  # CSV: a quoted field may hold newlines, so a row's lines count together
        self.blank_ahead, self.line_ahead = 0, None  # what first() read, to be read again
        self.file = _open_bytes(path)

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.blank_ahead:
            self.blank_ahead -= 1
            return "\n"
        if self.line_ahead is not None:
            line, self.line_ahead = self.line_ahead, None
            return line
        raw = _guarded_read(self.path, lambda: self.file.readline(MAX_LINE_BYTES + 1))
        if not raw:
            raise StopIteration
        self.number += 1
        values = raw.count(b",") + raw.count(b"\t") + raw.count(b"[") + raw.count(b"{")  # >= fields or values
        if not self.rows_span_lines:
            self.row_bytes = self.row_values = 0
        self.row_bytes, self.row_values = self.row_bytes + len(raw), self.row_values + values
        if len(raw) > MAX_LINE_BYTES or self.row_bytes > MAX_LINE_BYTES:
            raise _TooLong(f"{self.path}:{self.number}: a {'line' if len(raw) > MAX_LINE_BYTES else 'row'} of more "
                           f"than {MAX_LINE_BYTES >> 20} MiB; one row holds one explanation (at most {MAX_TEXT:,} "
                           "characters): check the file, or split the row")
        if self.row_values > MAX_LINE_VALUES:
            raise _TooLong(f"{self.path}:{self.number}: a row of more than {MAX_LINE_VALUES:,} fields or JSON "
                           "values; one row holds one explanation: check the file, or split the row")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise AnnotationError(f"{self.path}:{self.number}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset "
                                  f"{self.offset + err.start}); save the file as UTF-8") from None
        self.offset += len(raw)
        return line[1:] if self.number == 1 and line.startswith("\ufeff") else line

    def first(self) -> str:
        """The first line that is not blank ("" when there is none), left to be read again (blank lines before it
        are counted, not kept: a file of nothing but newlines must not fill memory)."""
        blank = 0
        for line in self:
            if line.strip():
                self.blank_ahead, self.line_ahead = blank, line
                return line
            blank += 1
        self.blank_ahead = blank
        return ""

    def row_done(self) -> None:
        """A CSV row was read whole: the next row's lines count afresh against the caps."""
        self.row_bytes = self.row_values = 0


def _open_bytes(path: Path) -> IO[bytes]:
    try:
        return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    except OSError as err:
        raise AnnotationError(f"{path}: cannot read it ({err.strerror}); check the path and its permissions") from None


def _guarded_read(path: Path, read: Callable[[], bytes]) -> bytes:
    """read(), with damaged or truncated gzip data (or a failing disk) said in one line."""
    try:
        return read()
    except (OSError, EOFError, zlib.error) as err:
        if not path.name.lower().endswith(".gz"):
            raise AnnotationError(f"{path}: cannot read it ({err}); check the file and its permissions") from None
        raise AnnotationError(f"{path}: not a valid gzip file ({err}); download it again or decompress it "
                              "yourself") from None


def _read_text(path: Path, limit: int | None = None) -> str | None:
    """A whole file's text (JSON parsed whole: a .json file, a delphi file), decompressed; None when it is too big
    to parse whole: more than `limit` bytes (MAX_DOCUMENT_BYTES; the rest is never read) or MAX_DOCUMENT_VALUES
    values."""
    limit = MAX_DOCUMENT_BYTES if limit is None else limit
    with _open_bytes(path) as file:
        data = _guarded_read(path, lambda: file.read(limit + 1))
    if len(data) > limit or data.count(b",") + data.count(b"[") + data.count(b"{") > MAX_DOCUMENT_VALUES:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise AnnotationError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
                              "save the file as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def _too_big() -> str:
    return f"more than {MAX_DOCUMENT_BYTES >> 20} MiB or {MAX_DOCUMENT_VALUES:,} JSON values"


def _read_small(path: Path, what: str) -> str:
    """A file that is parsed whole and is small by nature (a delphi explanation or score file)."""
    text = _read_text(path)
    if text is None:
        raise AnnotationError(f"{path}: {_too_big()}, too big for {what}; check the file, or remove it")
    return text


def _csv_records(path: Path, lines: _Lines, delimiter: str) -> Iterator[Record]:
    lines.rows_span_lines = True
    reader = csv.reader(lines, delimiter=delimiter)
    header: list[str] | None = None
    end = 0
    try:
        for row in reader:
            lines.row_done()
            start, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in row]
                duplicated = sorted({h for h in header if h and header.count(h) > 1})
                if duplicated:
                    raise AnnotationError(f"{path}:{start}: column {_shown(duplicated[0])} appears twice in the "
                                          "header; rename one")
                if not any(k in header for k in TEXT_KEYS):
                    raise AnnotationError(f"{path}:{start}: the header has no text column; name it one of "
                                          f"{', '.join(TEXT_KEYS)} (the header is the first line)")
                continue
            if len(row) > len(header):
                raise AnnotationError(f"{path}:{start}: {len(row)} fields but the header has {len(header)}; quote "
                                      "fields that contain the delimiter")
            yield _generic_record(f"{path}:{start}", dict(zip(header, row, strict=False)))
    except csv.Error as err:
        raise AnnotationError(f"{path}:{reader.line_num}: not valid CSV ({err}); fix the quoting") from None
    if header is None:
        raise AnnotationError(f"{path}: empty; a .csv file needs a header line (e.g. unit,text) and rows")


def _jsonl_records(path: Path, lines: Iterable[str]) -> Iterator[Record]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        row = _json_loads(line, where, "each line of a .jsonl file must be one JSON object")
        yield from _row_records(where, row)


def _json_records(path: Path) -> Iterator[Record]:
    """A .json file, parsed whole when it is small enough (_read_text); a bigger one is read a line at a time
    if it is JSON lines under another name, else refused."""
    text = _read_text(path)
    if text is None:
        with _Lines(path) as lines:
            try:
                one_line = isinstance(json.loads(lines.first()), dict)
            except (_TooLong, ValueError, RecursionError):
                one_line = False
            if not one_line:
                raise AnnotationError(f"{path}: a JSON document of {_too_big()}, too big to parse whole; write it "
                                      "as JSON lines (.jsonl, one object a line), which are read a line at a time")
            yield from _jsonl_records(path, lines)
        return
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several objects, one a line: JSON lines under another name
            yield from _jsonl_records(path, text.split("\n"))
            return
        raise AnnotationError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno}); fix it, or "
                              "give the file the extension of its format (.jsonl, .csv)") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise AnnotationError(f"{path}: not valid JSON ({_first_line(err)}); fix it") from None
    except RecursionError:
        raise AnnotationError(f"{path}: JSON nested too deeply to be explanations; check the file") from None
    del text
    if isinstance(parsed, dict) and isinstance(parsed.get("explanations"), list) and not _is_neuronpedia(parsed):
        parsed = parsed["explanations"]
    rows = parsed if isinstance(parsed, list) else [parsed]
    for number, row in enumerate(rows, start=1):
        yield from _row_records(f"{path}: row {number}" if isinstance(parsed, list) else str(path), row)


def _json_loads(text: str, where: str, fix: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{where}: not valid JSON ({err.msg}, column {err.colno}); {fix}") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise AnnotationError(f"{where}: not valid JSON ({_first_line(err)}); {fix}") from None
    except RecursionError:
        raise AnnotationError(f"{where}: JSON nested too deeply to be an explanation; {fix}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _shown(value: object) -> str:
    """Untrusted values for a one-line message: a repr cut short, however big or deeply nested the value is."""
    return _REPR.repr(value)


def _brief(value: object) -> str:
    """A value as text for a message, at most 60 characters of it."""
    return (value if isinstance(value, str) else _shown(value))[:60]


def _row_records(where: str, row: object) -> Iterator[Record]:
    if not isinstance(row, dict):
        raise AnnotationError(f"{where}: a JSON {type(row).__name__}, not an object; each row must be an object "
                              'such as {"unit": "mlp/12/345", "text": "..."}')
    if _is_neuronpedia(row):
        yield from _neuronpedia_records(where, row)
    else:
        yield _generic_record(where, row)


def _lower_keys(row: dict) -> dict[str, object]:
    lowered: dict[str, object] = {}
    for key, value in row.items():
        lowered.setdefault(str(key).strip().lower(), value)
    return lowered


def _is_neuronpedia(row: dict) -> bool:
    keys = _lower_keys(row)
    layer = keys.get("layer")
    return "modelid" in keys or (isinstance(layer, str) and NEURONPEDIA_LAYER.fullmatch(layer.strip()) is not None
                                 and "-" in layer and "index" in keys)


def _generic_record(where: str, row: dict) -> Record:
    """A row of our own format: an address (`unit`/`address`) or model/source/layer/unit columns, a text, and
    optionally a score, its kind and an author."""
    keys = _lower_keys(row)
    record = Record(where=where, text=_text(where, keys), score=_score(where, keys.get("score")),
                    score_kind=_name(where, "score_kind", _first(keys, SCORE_KIND_KEYS)),
                    author=_name(where, "author", keys.get("author")))
    address = keys.get("address")
    unit_key = next((k for k in UNIT_KEYS if _present(keys.get(k))), None)
    unit_value = keys.get(unit_key) if unit_key else None
    if not _present(address) and unit_key == "unit" and not _present(keys.get("layer")) \
            and isinstance(unit_value, str) and not unit_value.strip().isdigit():
        address = unit_value  # `unit` holding a whole address, e.g. mlp/12/345
    if _present(address):
        if not isinstance(address, str):
            raise AnnotationError(f"{where}: the unit address {_shown(address)} is not text; write one such as "
                                  "mlp/12/345")
        record.address = address
        return record
    if unit_key is None:
        raise AnnotationError(f"{where}: no unit; give an `address` or `unit` column (e.g. mlp/12/345), or layer "
                              "and unit columns (and source, when the store has several)")
    record.unit = _int(where, unit_key, unit_value)
    record.layer = _int(where, "layer", keys["layer"]) if _present(keys.get("layer")) else None
    for name in ("source", "model"):
        value = keys.get(name)
        if _present(value):
            if not isinstance(value, str):
                raise AnnotationError(f"{where}: {name} {_shown(value)} is not text; write e.g. "
                                      f"{'mlp or sae:NAME' if name == 'source' else 'the model name in the store'}")
            setattr(record, name, value.strip())
    return record


def _neuronpedia_records(where: str, row: dict) -> Iterator[Record]:
    """Neuronpedia's explanation rows (modelId, layer such as '12-res-jb', index, description,
    explanationModelName, scores), or a feature with its list of `explanations`."""
    keys = _lower_keys(row)
    layer_id = keys.get("layer")
    if isinstance(layer_id, int) and not isinstance(layer_id, bool):
        layer_id = str(layer_id)
    match = NEURONPEDIA_LAYER.fullmatch(layer_id.strip()) if isinstance(layer_id, str) else None
    if match is None:
        raise AnnotationError(f"{where}: Neuronpedia layer {_shown(layer_id)} is not LAYER-SET such as "
                              "'12-res-jb'; fix the row")
    model_id = keys.get("modelid")
    if model_id is not None and not isinstance(model_id, str):
        raise AnnotationError(f"{where}: modelId {_shown(model_id)} is not text; fix the row")
    unit, layer = _int(where, "index", keys.get("index")), _int(where, "layer", match["layer"])
    items = keys.get("explanations") if not _present(keys.get("description")) else None
    if items is None:
        items = [row]
    elif not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise AnnotationError(f"{where}: `explanations` is not a list of objects; fix the row")
    for item in items:
        item_keys = _lower_keys(item)
        score, kind = _neuronpedia_score(where, item_keys)
        yield Record(where=where, text=_text(where, item_keys, ("description", "text", "explanation")),
                     score=score, score_kind=kind,
                     author=_name(where, "explanationModelName", item_keys.get("explanationmodelname"))
                     or _name(where, "author", item_keys.get("author")),
                     layer=layer, unit=unit, foreign=layer_id.strip(), foreign_kind="neuronpedia",
                     foreign_set=match["set"], foreign_model=model_id)


def _neuronpedia_score(where: str, keys: dict[str, object]) -> tuple[float | None, str | None]:
    """The first of an explanation's `scores` (value and explanationScoreTypeName), else scoreV2, else `score`."""
    scores = keys.get("scores")
    if _present(scores):
        if not isinstance(scores, list) or not all(isinstance(s, dict) for s in scores):
            raise AnnotationError(f"{where}: `scores` is not a list of objects with a value; fix the row")
        for item in scores:
            item_keys = _lower_keys(item)
            if _present(item_keys.get("value")):
                return (_score(where, item_keys["value"]),
                        _name(where, "explanationScoreTypeName", item_keys.get("explanationscoretypename")))
    if _present(keys.get("scorev2")):
        return _score(where, keys["scorev2"]), "neuronpedia scoreV2"
    return _score(where, keys.get("score")), _name(where, "score_kind", _first(keys, SCORE_KIND_KEYS))


def _delphi_records(folder: Path, files: list[tuple[str, int, Path]],
                    summary: AnnotateSummary | None) -> Iterator[Record]:
    """delphi's per-latent files; the run folder above them may hold run_config.json (the explainer model, the
    author) and scores/SCORER/ files (lists of predictions; their accuracy becomes the score)."""
    run = folder.parent
    config = _delphi_config(run / "run_config.json")
    explainer, model = config.get("explainer_model"), config.get("model")
    scorers = _delphi_scorers(run / "scores")
    for module, latent, path in files:
        where = str(path)
        text = _read_small(path, "a delphi explanation file")
        explanation = _json_loads(text, where, "a delphi explanation file holds one JSON string, e.g. "
                                               '"Words about cats"; fix or remove the file')
        if not isinstance(explanation, str):
            raise AnnotationError(f"{where}: holds a JSON {type(explanation).__name__}, not the string delphi "
                                  'writes (e.g. "Words about cats"); fix or remove the file')
        if explanation.strip() == DELPHI_PLACEHOLDER:
            if summary is not None:
                summary.placeholders += 1
            continue
        score, kind = _delphi_score(scorers, module, latent)
        yield Record(where=where, text=_text(where, {"text": explanation}), score=score, score_kind=kind,
                     author=explainer if isinstance(explainer, str) and explainer.strip() else None,
                     layer=_module_layer(module), unit=latent, foreign=module, foreign_kind="delphi",
                     foreign_model=model if isinstance(model, str) else None)


def _delphi_config(path: Path) -> dict:
    """run_config.json, when there is a readable one: it only adds the author and the model's name."""
    try:
        parsed = json.loads(_read_text(path, MAX_LINE_BYTES) or "null")
    except (AnnotationError, ValueError, RecursionError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _delphi_scorers(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: (
        DELPHI_SCORERS.index(p.name) if p.name in DELPHI_SCORERS else len(DELPHI_SCORERS), p.name))
    return found


def _delphi_score(scorers: list[Path], module: str, latent: int) -> tuple[float | None, str | None]:
    """Accuracy of the first scorer that scored this latent: the share of its predictions that were correct."""
    for scorer in scorers:
        path = scorer / f"{module.replace('/', '--')}_latent{latent}.txt"
        if not path.is_file():
            continue
        parsed = _json_loads(_read_small(path, "a delphi score file"), str(path),
                             "a delphi score file holds a JSON list of predictions; fix or remove it")
        if not isinstance(parsed, list) or not all(isinstance(p, dict) for p in parsed):
            raise AnnotationError(f"{path}: not a delphi score file (a JSON list of objects with `correct`); fix "
                                  "or remove it")
        judged = [p["correct"] for p in parsed if isinstance(p.get("correct"), bool)]
        if judged:
            return sum(judged) / len(judged), f"delphi {scorer.name} accuracy"
    return None, None


# ---- values --------------------------------------------------------------------------------------------------

def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _first(keys: dict[str, object], names: Sequence[str]) -> object:
    return next((keys[n] for n in names if _present(keys.get(n))), None)


def _text(where: str, keys: dict[str, object], names: Sequence[str] = TEXT_KEYS) -> str:
    value = _first(keys, names)
    if value is None:
        raise AnnotationError(f"{where}: no explanation text; give it in a `{names[0]}` field (or "
                              f"{', '.join(names[1:])})")
    if not isinstance(value, str):
        raise AnnotationError(f"{where}: the explanation {_shown(value)} is not text; quote it")
    if len(value) > MAX_TEXT:
        raise AnnotationError(f"{where}: an explanation of {len(value):,} characters (at most {MAX_TEXT:,}); "
                              "shorten it")
    return value  # verbatim: whatever it holds is for the site to escape


def _name(where: str, what: str, value: object) -> str | None:
    if not _present(value):
        return None
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise AnnotationError(f"{where}: {what} {_brief(value)!r} is not a name of at most {MAX_NAME} "
                              "characters; fix the row")
    return value.strip()


def _score(where: str, value: object) -> float | None:
    if not _present(value):
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        score = float(value)
    except (ValueError, OverflowError):
        score = math.nan
    if not math.isfinite(score):
        raise AnnotationError(f"{where}: score {_brief(value)!r} is not a finite number; fix it or leave it "
                              "empty")
    return score


def _int(where: str, what: str, value: object) -> int:
    """A unit or layer number: stores hold them as 32-bit integers, so a bigger one names nothing."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT:
        return value
    text = value.strip() if isinstance(value, str) else ""
    if text.isascii() and text.isdigit() and len(text.lstrip("0")) <= len(str(MAX_INT)) and int(text) <= MAX_INT:
        return int(text)
    raise AnnotationError(f"{where}: {what} {_brief(value)!r} is not a unit or layer number (0, 1, 2 ...); fix "
                          "the row")
