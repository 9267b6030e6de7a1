"""Big corpora, streamed: every format read incrementally in flat memory, pre-tokenised datasets, hub datasets,
and one clear line for each kind of malformed input."""

from __future__ import annotations

import gzip
import json
import random
import socket
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import zstandard

from featureatlas.cli import main
from featureatlas.harvest.contexts import iter_contexts
from featureatlas.load import corpus
from featureatlas.load.corpus import CorpusError, Document, check_corpus, iter_documents

from helpers.tiny_models import save_tiny_model, tiny_tokenizer, write_corpus

TEXTS = ["first document", "", "  ", "second — café ü", "third\nwith two lines", None]


def records() -> list[dict]:
    return [{"text": text, "meta": i} for i, text in enumerate(TEXTS)]


def write_jsonl(file: Path, rows: list[dict]) -> Path:
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    if file.name.endswith(".gz"):
        data = gzip.compress(data)
    elif file.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    file.write_bytes(data)
    return file


def write_arrow_stream(file: Path, table: pa.Table, batch_rows: int = 2) -> Path:
    """As `datasets` writes its shards: the Arrow IPC stream format, in small record batches."""
    with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(batch_rows):
            writer.write_batch(batch)
    return file


def names_and_texts(path: Path, **kwargs) -> list[tuple[str, str]]:
    return [(d.name, d.text) for d in iter_documents(path, **kwargs)]


def test_every_format_reads_the_same_documents(tmp_path: Path) -> None:
    non_null = [r for r in records() if r["text"] is not None]  # JSON lines refuse a null text
    expected = [(1, "first document"), (4, "second — café ü"), (5, "third\nwith two lines")]
    for suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        file = write_jsonl(tmp_path / f"c{suffix}", non_null)
        assert names_and_texts(file) == [(f"c{suffix}:{line}", text) for line, text in expected]
    table = pa.table({"meta": list(range(len(TEXTS))), "text": TEXTS})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=2)  # three row groups
    write_arrow_stream(tmp_path / "c.arrow", table)
    feather.write_feather(table, tmp_path / "f.arrow", chunksize=2)  # the IPC file format
    for file in ("c.parquet", "c.arrow", "f.arrow"):
        assert names_and_texts(tmp_path / file) == [(f"{file}#row{row}", text) for row, text in
                                                   [(0, "first document"), (3, "second — café ü"),
                                                    (4, "third\nwith two lines")]]
    assert [d.name for d in iter_documents(tmp_path)][:3] == ["c.arrow#row0", "c.arrow#row3", "c.arrow#row4"]


def test_saved_dataset_folders(tmp_path: Path) -> None:
    """Folders as `Dataset.save_to_disk` and `DatasetDict.save_to_disk` write them (mimicked with pyarrow, so the
    test needs no `datasets`; test_real_save_to_disk checks the real thing where it is installed)."""
    def save(folder: Path, texts: list[str], shards: int = 2) -> None:
        folder.mkdir(parents=True)
        names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
        for i, name in enumerate(names):
            write_arrow_stream(folder / name, pa.table({"text": texts[i::shards]}))
        (folder / "cache-stale.arrow").write_bytes(b"not listed in state.json: never read")
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
        (folder / "dataset_info.json").write_text("{}")

    save(tmp_path / "one", ["a", "b", "c"])
    assert names_and_texts(tmp_path / "one") == [
        ("data-00000-of-00002.arrow#row0", "a"), ("data-00000-of-00002.arrow#row1", "c"),
        ("data-00001-of-00002.arrow#row0", "b")]
    both = tmp_path / "dict"
    save(both / "train", ["t1", "t2"])
    save(both / "test", ["x1"], shards=1)
    (both / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert [t for _, t in names_and_texts(both)] == ["t1", "t2"]  # train by default
    assert names_and_texts(both, split="test") == [("test/data-00000-of-00001.arrow#row0", "x1")]
    with pytest.raises(CorpusError, match=r"splits train, test; pick one with split \('dev' is not one\)"):
        check_corpus(both, "dev")
    (tmp_path / "one" / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(CorpusError, match="listed in .*state.json but missing"):
        check_corpus(tmp_path / "one")


def test_real_save_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["alpha", "", "gamma"], "input_ids": [[5, 6], [7], []]})
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    assert [d.text for d in iter_documents(tmp_path / "saved")] == ["alpha", "gamma"]
    assert [d.token_ids for d in iter_documents(tmp_path / "saved", token_field="input_ids")] == [[5, 6], [7]]
    datasets.DatasetDict({"train": ds, "validation": ds.select([2])}).save_to_disk(str(tmp_path / "dict"))
    assert [d.text for d in iter_documents(tmp_path / "dict", split="validation")] == ["gamma"]


def test_split_picks_files_named_for_it(tmp_path: Path) -> None:
    """A hub dataset's folder as downloaded: data/train-00000-of-00002.parquet and so on."""
    (tmp_path / "data").mkdir()
    for name, text in (("train-00000-of-00002", "t0"), ("train-00001-of-00002", "t1"), ("test-00000-of-00001", "x"),
                       ("latest-00000-of-00001", "not the test split")):
        pq.write_table(pa.table({"text": [text]}), tmp_path / "data" / f"{name}.parquet")
    (tmp_path / ".cache").mkdir()  # huggingface-cli's bookkeeping: hidden, never read
    write_jsonl(tmp_path / ".cache" / "x.jsonl", [{"oops": 1}])
    assert [t for _, t in names_and_texts(tmp_path, split="train")] == ["t0", "t1"]
    assert [t for _, t in names_and_texts(tmp_path, split="test")] == ["x"]
    assert len(names_and_texts(tmp_path)) == 4
    with pytest.raises(CorpusError, match="no files of split 'dev'"):
        check_corpus(tmp_path, "dev")
    with pytest.raises(CorpusError, match="one file has no splits; leave out split train, or pass the folder"):
        check_corpus(tmp_path / "data" / "test-00000-of-00001.parquet", "train")


def test_pretokenised_columns_are_used_as_is(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    text = "the quick brown fox jumps over the lazy dog " * 3
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    pq.write_table(pa.table({"input_ids": pa.array([[bos] + ids, [], None, ids[:5]], pa.list_(pa.int32())),
                             "attention_mask": [[1] * (len(ids) + 1), [], None, [1] * 5]}),
                   tmp_path / "tok.parquet", row_group_size=3)
    docs = list(iter_documents(tmp_path / "tok.parquet"))  # no text column: input_ids found by itself
    assert [(d.name, d.text, d.token_ids) for d in docs] == [
        ("tok.parquet#row0", "", [bos] + ids), ("tok.parquet#row3", "", ids[:5])]
    from_text = list(iter_contexts([Document("a", text)], tok, 8, None, lambda d: None))
    seen = []
    from_ids = list(iter_contexts(docs[:1], tok, 8, None, seen.append))
    assert [c.token_ids for c in from_ids] == [c.token_ids for c in from_text]  # the leading BOS is not doubled
    assert seen[0].n_tokens == len(ids)
    write_jsonl(tmp_path / "t.jsonl", [{"tokens": ids[:3], "text": "ignored"}])
    assert [d.token_ids for d in iter_documents(tmp_path / "t.jsonl", token_field="tokens")] == [ids[:3]]
    assert [d.text for d in iter_documents(tmp_path / "t.jsonl")] == ["ignored"]  # text wins unless asked
    write_jsonl(tmp_path / "u.jsonl", [{"tokens": ids[:3]}, {"tokens": []}, {"tokens": [7]}])
    assert [(d.name, d.token_ids) for d in iter_documents(tmp_path / "u.jsonl")] == [
        ("u.jsonl:1", ids[:3]), ("u.jsonl:3", [7])]
    write_jsonl(tmp_path / "far.jsonl", [{"input_ids": [3, 4000]}])
    with pytest.raises(CorpusError, match=r"far.jsonl:1: token id 4000 is outside this tokenizer's vocabulary"):
        list(iter_contexts(iter_documents(tmp_path / "far.jsonl"), tok, 8, None, lambda d: None))


@pytest.mark.model
def test_pretokenised_harvest_has_the_text_harvests_contexts(tmp_path: Path) -> None:
    """The corpus as token ids (BOS-prefixed, as many pre-tokenised datasets are), harvested from the command line:
    the store holds the contexts the text would have made."""
    model = save_tiny_model("llama", tmp_path / "model")
    text_corpus = write_corpus(tmp_path / "corpus")
    tok = tiny_tokenizer()
    texts = [f.read_text() for f in sorted(text_corpus.glob("*.txt")) if f.read_text().strip()]
    rows = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    pq.write_table(pa.table({"ids": rows, "text": ["not read"] * len(rows)}), tmp_path / "ids.parquet")
    out = tmp_path / "ids.duckdb"
    assert main(["harvest", "--model", str(model), "--corpus", str(tmp_path / "ids.parquet"), "--out", str(out),
                 "--token-field", "ids", "--context-length", "16", "--layers", "1", "--top-k", "3", "--logits", "0",
                 "--device", "cpu", "--compile", "off"]) == 0
    con = duckdb.connect(str(out), read_only=True)
    stored = con.execute("SELECT context_id, document_id, start_token, token_ids FROM contexts").fetchall()
    from_text = {c.context_id: (c.context_id, c.document_id, c.start_token, c.token_ids) for c in
                 iter_contexts([Document(str(i), t) for i, t in enumerate(texts)], tok, 16, None, lambda d: None)}
    assert stored and all(row == from_text[row[0]] for row in stored)  # the contexts some unit keeps
    assert con.execute("SELECT name, n_tokens FROM documents ORDER BY document_id").fetchall() == [
        (f"ids.parquet#row{i}", len(r) - 1) for i, r in enumerate(rows)]
    settings = json.loads(con.execute("SELECT settings FROM runs").fetchone()[0])
    assert settings["token_field"] == "ids" and settings["split"] is None


@pytest.mark.parametrize("case, expected", [
    ("bad_json_gz", r"c.jsonl.gz:2: not a JSON object \(Expecting property name"),
    ("missing_field", r"c.jsonl:2: no 'text' field; name the text field with text_field"),
    ("wrong_type", r"c.jsonl:1: field 'text' is a number, not a string; name the text field with text_field"),
    ("not_an_object", r"c.jsonl:1: not a JSON object \(got a list\)"),
    ("non_utf8_line", r"c.jsonl:2: not UTF-8 \(byte 0xe9 at column 14\); write the file as UTF-8"),
    ("truncated_gz", r"c.jsonl.gz: truncated after line \d+ \(the compressed data ends early\); the file is "
                     r"incomplete"),
    ("corrupt_gz", r"c.jsonl.gz: not valid gzip data after line 0 \(Not a gzipped file"),
    ("truncated_zst", r"c.jsonl.zst: truncated \(the zstd data ends inside a frame\); the file is incomplete"),
    ("corrupt_zst", r"c.jsonl.zst: not zstd data \(no zstd frame at byte 0\); check the file, e.g. with `zstd -t`"),
    ("garbage_after_zst", r"c.jsonl.zst: not zstd data \(no zstd frame at byte \d+\)"),
    ("damaged_zst_block", r"c.jsonl.zst: not valid zstd data after line \d+ \(.+\); check the file"),
    ("token_field_not_ids", r"c.jsonl:1: field 'ids' is a list, not a list of integer token ids"),
    ("parquet_wrong_type", r"c.parquet: column 'text' is int64, not text; name the text column with text_field"),
    ("parquet_no_column", r"c.parquet: no column 'text' \(columns: body\); name the text column with text_field"),
    ("parquet_token_column_of_floats", r"c.parquet: column 'input_ids' is list<\w+: double>, not a list of "
                                       r"integer token ids"),
    ("not_parquet", r"c.parquet: not a readable parquet file"),
    ("not_arrow", r"c.arrow: not a readable arrow file"),
    ("unknown_suffix", r"c.json.gz: unknown corpus format '.json.gz'; use .txt, .jsonl or .parquet \(or .jsonl.gz, "),
    ("non_utf8_txt_past_first_chunk", r"c.txt: not UTF-8 \(byte 0xff at offset 100\)"),
])
def test_malformed_input_gets_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str,
                                             expected: str) -> None:
    token_field = None
    many = [{"text": f"line {i} " * 20} for i in range(3000)]
    file = {"bad_json_gz": "c.jsonl.gz", "truncated_gz": "c.jsonl.gz", "corrupt_gz": "c.jsonl.gz",
            "truncated_zst": "c.jsonl.zst", "corrupt_zst": "c.jsonl.zst", "garbage_after_zst": "c.jsonl.zst",
            "damaged_zst_block": "c.jsonl.zst", "unknown_suffix": "c.json.gz",
            "not_arrow": "c.arrow", "non_utf8_txt_past_first_chunk": "c.txt"}.get(
        case, "c.parquet" if "parquet" in case else "c.jsonl")
    path = tmp_path / file
    if case == "bad_json_gz":
        path.write_bytes(gzip.compress(b'{"text": "fine"}\n{not json}\n'))
    elif case == "missing_field":
        write_jsonl(path, [{"text": "fine"}, {"body": "elsewhere"}])
    elif case == "wrong_type":
        write_jsonl(path, [{"text": 3}])
    elif case == "not_an_object":
        write_jsonl(path, [["text"]])
    elif case == "non_utf8_line":
        path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    elif case in ("truncated_gz", "truncated_zst"):
        data = write_jsonl(path, many).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case in ("corrupt_gz", "corrupt_zst"):
        path.write_bytes(b"plain text, not compressed\n")
    elif case == "garbage_after_zst":
        path.write_bytes(write_jsonl(path, many).read_bytes() + b"trailing junk")
    elif case == "damaged_zst_block":
        data = bytearray(write_jsonl(path, many).read_bytes())
        data[40:104] = bytes(64)  # inside the first block: its headers are whole, its contents are not
        path.write_bytes(bytes(data))
    elif case == "token_field_not_ids":
        write_jsonl(path, [{"ids": ["a", "b"]}])
        token_field = "ids"
    elif case == "parquet_wrong_type":
        pq.write_table(pa.table({"text": [1, 2]}), path)
    elif case == "parquet_no_column":
        pq.write_table(pa.table({"body": ["x"]}), path)
    elif case == "parquet_token_column_of_floats":
        pq.write_table(pa.table({"input_ids": [[1.0, 2.0]]}), path)
        token_field = "input_ids"
    elif case in ("not_parquet", "not_arrow", "unknown_suffix"):
        path.write_bytes(b"something else entirely")
    elif case == "non_utf8_txt_past_first_chunk":
        monkeypatch.setattr(corpus, "_CHUNK", 7)  # the bad byte lies in a later chunk than the first
        path.write_bytes("é".encode() * 50 + b"\xff tail")
    with pytest.raises(CorpusError, match=expected) as raised:
        list(iter_documents(path, token_field=token_field))
    assert "\n" not in str(raised.value)


def test_zstd_frames_of_every_kind(tmp_path: Path) -> None:
    """Several frames (as pzstd and concatenated files have), a skippable frame, checksums, streamed frames
    without a content size, and RLE blocks."""
    frames = [zstandard.ZstdCompressor(level=3, write_checksum=True).compress(b'{"text": "one"}\n'),
              (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"skip!",
              zstandard.ZstdCompressor(level=19, write_content_size=False).compress(
                  b'{"text": "' + b"a" * 300_000 + b'"}\n'),
              zstandard.ZstdCompressor().compress(b"\n" * 1000 + b'{"text": "last"}\n')]
    (tmp_path / "c.jsonl.zst").write_bytes(b"".join(frames))
    docs = list(iter_documents(tmp_path / "c.jsonl.zst"))
    assert [(d.name, len(d.text)) for d in docs] == [("c.jsonl.zst:1", 3), ("c.jsonl.zst:2", 300_000),
                                                    ("c.jsonl.zst:1003", 4)]


def test_missing_zstandard_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = write_jsonl(tmp_path / "c.jsonl.zst", [{"text": "x"}])
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    with pytest.raises(CorpusError, match=r"reading .zst needs the package zstandard; install it with "
                                          r"`pip install zstandard`"):
        list(iter_documents(file))


def test_txt_is_read_in_chunks_and_cut_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks that split a character or a blank line change nothing: the pieces are those of the whole-file cut."""
    def whole_file_cut(name: str, text: str, limit: int) -> list[tuple[str, str]]:  # the former algorithm
        out, part, start = [], 0, 0
        while start < len(text):
            end = len(text)
            if end - start > limit:
                cut = text.rfind("\n\n", start, start + limit)
                end = cut + 2 if cut > start else start + limit
            if text[start:end].strip():
                out.append((name if part == 0 and end == len(text) else f"{name}#part{part}", text[start:end]))
            part, start = part + 1, end
        return out

    rng = random.Random(0)
    monkeypatch.setattr(corpus, "MAX_DOCUMENT_CHARS", 40)
    for chunk in (1, 3, 64):
        monkeypatch.setattr(corpus, "_CHUNK", chunk)
        for trial in range(20):
            text = "".join(rng.choice(["ab ", "é", "ü€", "\n", "\n\n", "   ", "word " * rng.randint(1, 12)])
                           for _ in range(rng.randint(0, 40)))
            (tmp_path / "t.txt").write_text(text, encoding="utf-8")
            assert names_and_texts(tmp_path / "t.txt") == whole_file_cut("t.txt", text, 40), (chunk, trial)


class _Fake:
    """Stands in for the `datasets` module: load_dataset returns rows as the streaming IterableDataset yields them."""

    def __init__(self, rows: list[dict], fail: Exception | None = None) -> None:
        self.rows, self.fail, self.calls = rows, fail, []

    def load_dataset(self, name: str, config: str | None, split: str, streaming: bool) -> Iterator[dict]:
        self.calls.append((name, config, split, streaming))
        if self.fail:
            raise self.fail
        return iter(self.rows)


def test_hub_dataset_streamed_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "_check_hub", lambda spec: None)
    fake = _Fake([{"text": "one"}, {"text": None}, {"text": ""}, {"text": "four"}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert names_and_texts(Path("someone/corpus:en"), split="validation") == [
        ("validation#row0", "one"), ("validation#row3", "four")]
    assert fake.calls == [("someone/corpus", "en", "validation", True)]
    fake.rows = [{"input_ids": [1, 2, 3]}, {"input_ids": "x"}]
    with pytest.raises(CorpusError, match=r"wiki \(train row 1\): field 'input_ids' is a string, not a list of "
                                          r"integer token ids"):
        list(iter_documents("wiki"))
    fake.fail = ValueError("Bad split: tset. Available splits: ['train']\nmore detail")
    with pytest.raises(CorpusError, match=r"^wiki: no such file or folder, and the hub dataset cannot be streamed "
                                          r"\(Bad split: tset. Available splits: \['train'\]\); check the name"):
        list(iter_documents("wiki", split="tset"))


def test_hub_dataset_offline_or_without_datasets_fails_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert corpus.hub_dataset("HuggingFaceFW/fineweb-edu:sample-10BT") == "HuggingFaceFW/fineweb-edu:sample-10BT"
    assert corpus.hub_dataset("/no/such/folder") is None and corpus.hub_dataset("missing.jsonl") is None
    started = time.perf_counter()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusError, match=r"^wiki: no such file or folder, and HF_HUB_OFFLINE is set, so it cannot "
                                          r"be streamed from the hub; pass a local file or folder"):
        check_corpus("wiki")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(CorpusError, match=r"^wiki: no such file or folder, and huggingface.co cannot be reached"):
        list(iter_documents("wiki"))
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CorpusError, match=r"to stream it as a hub dataset install the package datasets"):
        check_corpus("wiki")
    assert time.perf_counter() - started < 2


# Memory: nothing is read whole, and what is held does not grow with the corpus.

def _peak_while_reading(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """(documents, peak bytes Python allocated meanwhile); reading a file whole through Path fails the test."""
    def whole(self, *args, **kwargs):
        raise AssertionError(f"{self} was read whole")
    monkeypatch.setattr(Path, "read_bytes", whole)
    monkeypatch.setattr(Path, "read_text", whole)
    n = 0
    tracemalloc.start()
    try:
        for _ in iter_documents(path):
            n += 1
        return n, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        monkeypatch.undo()


def _big_jsonl(file: Path, megabytes: int) -> Path:
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(2000)]
    block = "".join(json.dumps({"text": " ".join(rng.choices(words, k=150)), "id": i}) + "\n"
                    for i in range(500)).encode()
    with open(file, "wb") as out:
        for _ in range(megabytes * 2**20 // len(block)):
            out.write(block)
    return file


def test_jsonl_memory_stays_flat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_n, small_peak = _peak_while_reading(_big_jsonl(tmp_path / "small.jsonl", 2), monkeypatch)
    big = _big_jsonl(tmp_path / "big.jsonl", 24)
    big_n, big_peak = _peak_while_reading(big, monkeypatch)
    assert big_n > 10 * small_n
    # Reading the file whole would hold 24 MB of bytes and as much again decoded; line by line holds one line
    # (about 1 KB) and the reader's buffers, whatever the size.
    assert big_peak < 2 * 2**20 and big_peak < small_peak + 512 * 2**10, (small_peak, big_peak)


def test_compressed_and_columnar_memory_stays_flat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _big_jsonl(tmp_path / "big.jsonl", 6)
    data = source.read_bytes()
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress(data, compresslevel=1))
    (tmp_path / "big.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=1).compress(data))
    texts = [json.loads(line)["text"] for line in data.splitlines()]
    pq.write_table(pa.table({"text": texts}), tmp_path / "big.parquet", row_group_size=1000)
    write_arrow_stream(tmp_path / "big.arrow", pa.table({"text": texts}), batch_rows=1000)
    del data
    for name in ("big.jsonl.gz", "big.jsonl.zst", "big.parquet", "big.arrow"):
        n, peak = _peak_while_reading(tmp_path / name, monkeypatch)
        assert n == len(texts)
        assert peak < 3 * 2**20, (name, peak)  # the file's text is 6 MB


def test_one_huge_txt_file_is_read_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paragraph = ("All the world's a stage, and all the men and women merely players. " * 12 + "\n\n").encode()
    with open(tmp_path / "huge.txt", "wb") as out:
        for _ in range(30 * 2**20 // (len(paragraph) * 100)):
            out.write(paragraph * 100)
    n, peak = _peak_while_reading(tmp_path / "huge.txt", monkeypatch)
    assert n >= 30  # documents of at most MAX_DOCUMENT_CHARS (1M characters)
    assert peak < 10 * 2**20, peak  # a few documents' worth, not the file's 30 MB
