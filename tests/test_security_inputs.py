"""Hostile corpora and explanation files: a 1 GiB single-line .jsonl, a 100M-character record, 1,000:1 gzip (and
zstd) bombs, lines of millions of tiny JSON values, CSV rows spanning lines, saved-dataset metadata that names
files outside its folder. Each is read in a stated memory bound or stops with one line.

Memory is measured as the growth of the peak resident size (ru_maxrss) of a child Python process that imports
only the reader, so the test process's own memory and torch play no part."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import zstandard

from featureatlas.annotate import explanations as annotate
from featureatlas.annotate.explanations import AnnotationError, read_explanations
from featureatlas.load import corpus
from featureatlas.load.corpus import CorpusError, Document, iter_documents

BOUND_MB = 600  # the most any one hostile file may make a reader grow, as docs/security.md states
GiB = 2**30

CHILD = r"""
import json, resource, sys
from pathlib import Path
kind, path = sys.argv[1], Path(sys.argv[2])
if kind == "corpus":
    from featureatlas.load.corpus import CorpusError as Refused, iter_documents as read
else:
    from featureatlas.annotate.explanations import AnnotationError as Refused, read_explanations as read
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"items": 0, "longest": 0, "chars": 0, "error": None}
try:
    for item in read(path):
        out["items"] += 1
        out["longest"] = max(out["longest"], len(item.text))
        out["chars"] += len(item.text)
except Refused as err:
    out["error"] = str(err)
out["grew_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(out))
"""


def read_in_child(kind: str, path: Path) -> dict:
    """What reading `path` gave in a fresh process (kind 'corpus' or 'annotate'), and how much its memory grew."""
    run = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


def refused(result: dict, message: str) -> None:
    """The reader stopped with one line holding `message`, in bounded memory."""
    assert result["error"] is not None and message in result["error"], result
    assert "\n" not in result["error"] and len(result["error"]) < 400, result["error"]
    assert result["grew_mb"] < BOUND_MB, result


def gzip_bomb(path: Path, decompressed: int = GiB, unit: bytes = b"a") -> Path:
    """`decompressed` bytes of `unit` repeated, without a newline, as gzip members of 16 MiB each (about 1,000:1)."""
    member = gzip.compress(unit * (16 * 2**20 // len(unit)), compresslevel=9)
    with open(path, "wb") as out:
        for _ in range(decompressed // (16 * 2**20)):
            out.write(member)
    assert decompressed / path.stat().st_size > 1000
    return path


def zstd_bomb(path: Path, decompressed: int = GiB) -> Path:
    compressor, chunk = zstandard.ZstdCompressor(level=3).compressobj(), b"a" * 16 * 2**20
    with open(path, "wb") as out:
        for _ in range(decompressed // len(chunk)):
            out.write(compressor.compress(chunk))
        out.write(compressor.flush())
    assert decompressed / path.stat().st_size > 1000
    return path


def one_line_of(path: Path, start: bytes, size: int = GiB) -> Path:
    """A file of `size` bytes on one line: `start`, then zeros, written sparsely (no disk space, no time)."""
    path.write_bytes(start)
    os.truncate(path, size)
    return path


# ---- corpora -------------------------------------------------------------------------------------------------

def test_a_1_gib_single_line_jsonl_stops_with_one_line(tmp_path: Path) -> None:
    result = read_in_child("corpus", one_line_of(tmp_path / "huge.jsonl", b'{"text": "'))
    refused(result, "huge.jsonl:1: a line of more than 64 MiB; keep each record under that")


@pytest.mark.parametrize("name", ["bomb.jsonl.gz", "bomb.jsonl.zst"])
def test_a_decompression_bomb_stops_with_one_line(tmp_path: Path, name: str) -> None:
    bomb = gzip_bomb(tmp_path / name) if name.endswith(".gz") else zstd_bomb(tmp_path / name)
    refused(read_in_child("corpus", bomb), f"{name}:1: a line of more than 64 MiB")


def test_a_100m_character_record_is_cut_into_documents(tmp_path: Path) -> None:
    paragraph = "a" * 4094 + "\n\n"
    text = paragraph * (100_000_000 // len(paragraph) + 1)
    pq.write_table(pa.table({"text": [text]}), tmp_path / "big.parquet")
    result = read_in_child("corpus", tmp_path / "big.parquet")
    assert result["error"] is None and result["chars"] == len(text) >= 100_000_000
    assert result["longest"] <= corpus.MAX_DOCUMENT_CHARS and result["items"] >= 100
    assert result["grew_mb"] < BOUND_MB, result


def test_a_jsonl_record_past_the_line_cap_stops_and_one_below_it_is_cut(tmp_path: Path) -> None:
    paragraph = "a" * 4094 + "\n\n"
    over = tmp_path / "over.jsonl.gz"
    with gzip.open(over, "wb", compresslevel=1) as out:
        out.write(b'{"text": "fine"}\n' + json.dumps({"text": paragraph * 25_000}).encode() + b"\n")  # 100M chars
    refused(read_in_child("corpus", over), "over.jsonl.gz:2: a line of more than 64 MiB")
    under = tmp_path / "under.jsonl.gz"
    with gzip.open(under, "wb", compresslevel=1) as out:
        out.write(json.dumps({"text": paragraph * 12_000}).encode() + b"\n")  # 49M characters
    result = read_in_child("corpus", under)
    assert result["error"] is None and result["chars"] == 12_000 * len(paragraph), result
    assert result["longest"] <= corpus.MAX_DOCUMENT_CHARS and result["grew_mb"] < BOUND_MB, result


def test_a_line_of_millions_of_tiny_values_stops(tmp_path: Path) -> None:
    """60 MiB of `[],` would make json.loads build over 1 GB of lists: refused from a count of its brackets."""
    bomb = tmp_path / "values.jsonl.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as out:
        out.write(b'{"text": "x", "pad": [' + b"[]," * (20 * 2**20) + b"[]]}\n")
    refused(read_in_child("corpus", bomb), f"values.jsonl.gz:1: a line of more than {corpus.MAX_LINE_VALUES:,} JSON "
                                           "values")
    worst = tmp_path / "under.jsonl.gz"  # {"a":1} costs the most memory per value counted: ~100 bytes
    with gzip.open(worst, "wb", compresslevel=1) as out:
        out.write(b'{"text": "x", "pad": [' + b'{"a":1},' * (corpus.MAX_LINE_VALUES // 2 - 10) + b"{}]}\n")
    result = read_in_child("corpus", worst)
    assert result["error"] is None and result["items"] == 1 and result["grew_mb"] < BOUND_MB, result


def test_token_ids_below_the_value_cap_are_read_in_bounds(tmp_path: Path) -> None:
    ids = tmp_path / "ids.jsonl.gz"
    with gzip.open(ids, "wb", compresslevel=1) as out:
        out.write(b'{"input_ids": [' + b"1000," * 2_500_000 + b"1]}\n")
    result = read_in_child("corpus", ids)
    assert result["error"] is None and result["items"] == 3 and result["grew_mb"] < BOUND_MB, result


class _Datasets:
    """Stands in for the `datasets` package (not installed here, and never the thing under test)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def load_dataset(self, name: str, config: str | None, split: str, streaming: bool) -> Iterator[dict]:
        return iter(self.rows)


def test_records_of_every_format_are_cut_as_txt_files_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "MAX_DOCUMENT_CHARS", 30)
    text = "first paragraph here\n\nsecond one, a bit longer\n\n" + "x" * 70 + "\nend"
    (tmp_path / "t.txt").write_text(text)
    pieces = [(d.name.removeprefix("t.txt"), d.text) for d in iter_documents(tmp_path / "t.txt")]
    assert "".join(p for _, p in pieces) == text and len(pieces) >= 4
    assert all(len(p) <= 30 for _, p in pieces)
    line = (json.dumps({"text": "short"}) + "\n" + json.dumps({"text": text}) + "\n").encode()
    (tmp_path / "c.jsonl").write_bytes(line)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(line))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(line))
    table = pa.table({"text": ["short", text]})
    pq.write_table(table, tmp_path / "c.parquet")
    feather.write_feather(table, tmp_path / "c.arrow")
    monkeypatch.setattr(corpus, "_check_hub", lambda spec: None)
    monkeypatch.setitem(sys.modules, "datasets", _Datasets([{"text": "short"}, {"text": text}]))
    for source, second in [("c.jsonl", "c.jsonl:2"), ("c.jsonl.gz", "c.jsonl.gz:2"), ("c.jsonl.zst", "c.jsonl.zst:2"),
                           ("c.parquet", "c.parquet#row1"), ("c.arrow", "c.arrow#row1"), ("someone/hub", "train#row1")]:
        docs = list(iter_documents(tmp_path / source if "." in source else source))
        assert [(d.name, d.text) for d in docs] == [(docs[0].name, "short")] + [
            (f"{second}{suffix}", piece) for suffix, piece in pieces], source


def test_token_id_records_are_cut_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "MAX_DOCUMENT_CHARS", 4)
    (tmp_path / "c.jsonl").write_text(json.dumps({"input_ids": list(range(10))}) + "\n")
    pq.write_table(pa.table({"input_ids": [list(range(10)), [], [7]]}), tmp_path / "c.parquet")
    assert list(iter_documents(tmp_path / "c.jsonl")) == [
        Document("c.jsonl:1#part0", "", [0, 1, 2, 3]), Document("c.jsonl:1#part1", "", [4, 5, 6, 7]),
        Document("c.jsonl:1#part2", "", [8, 9])]
    assert [(d.name, d.token_ids) for d in iter_documents(tmp_path / "c.parquet")] == [
        ("c.parquet#row0#part0", [0, 1, 2, 3]), ("c.parquet#row0#part1", [4, 5, 6, 7]),
        ("c.parquet#row0#part2", [8, 9]), ("c.parquet#row2", [7])]


@pytest.mark.parametrize("listed", ["../secret.arrow", "/etc/hostname", "sub/data.arrow", "notes.txt", "..",
                                    "1" * 300 + ".arrow"])
def test_saved_dataset_metadata_cannot_name_files_outside_its_folder(tmp_path: Path, listed: str) -> None:
    """state.json lists the arrow files to read; a crafted one could otherwise have any file on the machine
    harvested into the store (and published with its site)."""
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": listed}]}))
    with pytest.raises(CorpusError, match=r"state\.json: _data_files names .*, not an \.arrow file in the same "
                                          r"folder; pass a folder written by `Dataset.save_to_disk`"):
        list(iter_documents(saved))
    (saved / "state.json").unlink()
    for split in ("../../elsewhere", "1" * 300):  # a name too long for the file system fails to stat: refused
        (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["train", split]}))
        with pytest.raises(CorpusError, match=r"dataset_dict\.json: splits is not a list of folder names"):
            list(iter_documents(saved))


def test_oversized_dataset_metadata_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "MAX_METADATA_BYTES", 100)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "x.arrow"}] * 10}))
    with pytest.raises(CorpusError, match=r"state\.json: more than 0 MiB, too big for a saved dataset's metadata"):
        list(iter_documents(saved))


# ---- explanation files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bomb.jsonl.gz", "bomb.csv.gz", "bomb.json.gz"])
def test_explanation_bombs_stop_with_one_line(tmp_path: Path, name: str) -> None:
    expected = (f": a JSON document of more than 64 MiB or {annotate.MAX_DOCUMENT_VALUES:,} JSON values, too big "
                "to parse whole"
                if name == "bomb.json.gz" else ":1: a line of more than 16 MiB")
    refused(read_in_child("annotate", gzip_bomb(tmp_path / name)), f"{name}{expected}")


@pytest.mark.parametrize("name", ["huge.jsonl", "huge.csv", "huge.json"])
def test_a_1_gib_single_line_explanation_file_stops_with_one_line(tmp_path: Path, name: str) -> None:
    result = read_in_child("annotate", one_line_of(tmp_path / name, b"[" if name.endswith(".json") else b"unit,"))
    refused(result, "huge.json: a JSON document of more than 64 MiB" if name.endswith(".json")
            else f"{name}:1: a line of more than 16 MiB")


def test_csv_rows_spanning_lines_are_capped(tmp_path: Path) -> None:
    """Quoted fields may hold newlines, so one CSV row can span many lines: the row, not just each line, is capped."""
    field = '"' + "a" * 1000 + '\n",'
    bomb = tmp_path / "rows.csv.gz"
    bomb.write_bytes(gzip.compress(b"unit,text\n" + field.encode() * 20_000))
    refused(read_in_child("annotate", bomb), "a row of more than 16 MiB")  # no line of it is over 1 KB
    fields = tmp_path / "fields.csv"
    fields.write_text("unit,text\n" + "a," * 1_100_000 + "\n")
    refused(read_in_child("annotate", fields), "fields.csv:2: a row of more than 1,000,000 fields or JSON values")


def test_a_json_document_too_big_to_parse_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the cap, JSON lines under a .json name are read a line at a time; one JSON document is refused."""
    monkeypatch.setattr(annotate, "MAX_DOCUMENT_BYTES", 200)
    rows = [{"unit": f"mlp/1/{i}", "text": f"explanation {i}"} for i in range(20)]
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.address for r in read_explanations(tmp_path / "lines.json")] == [r["unit"] for r in rows]
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=1))
    with pytest.raises(AnnotationError, match=r"array\.json: a JSON document of more than 0 MiB or [\d,]+ JSON "
                                              r"values, too big to parse whole; write it as JSON lines"):
        list(read_explanations(tmp_path / "array.json"))
    (tmp_path / "layers.1_latent3.txt").write_text(json.dumps("x" * 300))
    with pytest.raises(AnnotationError, match=r"layers\.1_latent3\.txt: more than 0 MiB .* too big for a delphi "
                                              r"explanation file"):
        list(read_explanations(tmp_path / "layers.1_latent3.txt"))


def test_messages_quote_hostile_values_cut_short(tmp_path: Path) -> None:
    deep = {"unit": "mlp/1/1", "text": [[["x" * 1000] * 100] * 10] * 10}
    (tmp_path / "a.jsonl").write_text(json.dumps(deep) + "\n")
    with pytest.raises(AnnotationError,
                       match=r"a\.jsonl:1: the explanation \[\[\[\.\.\.\], .*, \.\.\.\] is not text") as caught:
        list(read_explanations(tmp_path / "a.jsonl"))
    assert len(str(caught.value)) < 400
    (tmp_path / "b.jsonl").write_text(json.dumps({"layer": "1" * 5000 + "-res-jb", "index": 1, "description": "x",
                                                  "modelId": "m"}) + "\n")
    with pytest.raises(AnnotationError, match=r"b\.jsonl:1: layer '1{40,}.*' is not a unit or layer number"):
        list(read_explanations(tmp_path / "b.jsonl"))
