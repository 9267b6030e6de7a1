"""Corpus formats, document boundaries, BOS, the token budget and display strings."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from featureatlas.harvest.contexts import display_tokens, iter_batches, iter_contexts
from featureatlas.load.corpus import CorpusError, Document, iter_documents

from helpers.tiny_models import tiny_tokenizer


def test_txt_jsonl_and_parquet_in_path_order(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "from json"}) + "\n\n" + json.dumps({"body": " "}) + "\n"
                                      + json.dumps({"body": "second"}) + "\n")
    (tmp_path / "a.txt").write_text("plain text\n")
    duckdb.sql(f"COPY (SELECT * FROM (VALUES ('row zero'), (''), ('row two')) t(body)) "
               f"TO '{tmp_path / 'c.parquet'}' (FORMAT parquet)")
    docs = list(iter_documents(tmp_path, text_field="body"))
    assert [(d.name, d.text) for d in docs] == [
        ("a.txt", "plain text\n"), ("b.jsonl:1", "from json"), ("b.jsonl:4", "second"),
        ("c.parquet#row0", "row zero"), ("c.parquet#row2", "row two")]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("nested")
    assert [d.name for d in iter_documents(tmp_path / "sub" / "d.txt")] == ["d.txt"]
    assert "sub/d.txt" in [d.name for d in iter_documents(tmp_path, text_field="body")]


def test_glob_pattern(tmp_path: Path) -> None:
    for name in ("x_gut.txt", "x_gut_f.txt", "y_gut.txt"):
        (tmp_path / name).write_text(name)
    assert [d.text for d in iter_documents(tmp_path / "*_gut.txt")] == ["x_gut.txt", "y_gut.txt"]
    with pytest.raises(CorpusError, match="matches no"):
        list(iter_documents(tmp_path / "*.none"))


def test_contexts_never_span_documents_and_start_with_bos() -> None:
    tok = tiny_tokenizer()
    docs = [Document("a", "the quick brown fox jumps over the lazy dog " * 3), Document("b", "To be, or not")]
    seen = []
    contexts = list(iter_contexts(docs, tok, 8, None, seen.append))
    ids_a = tok(docs[0].text, add_special_tokens=False)["input_ids"]
    ids_b = tok(docs[1].text, add_special_tokens=False)["input_ids"]
    assert [c.document_id for c in contexts] == [0] * -(-len(ids_a) // 7) + [1] * -(-len(ids_b) // 7)
    assert all(c.token_ids[0] == tok.bos_token_id and len(c.token_ids) <= 8 for c in contexts)
    assert sum((c.token_ids[1:] for c in contexts if c.document_id == 0), []) == ids_a
    assert [c.context_id for c in contexts] == list(range(len(contexts)))
    assert [(d.name, d.n_tokens) for d in seen] == [("a", len(ids_a)), ("b", len(ids_b))]


def test_token_budget_is_exact() -> None:
    tok = tiny_tokenizer()
    docs = [Document(str(i), "the quick brown fox jumps over the lazy dog") for i in range(10)]
    contexts = list(iter_contexts(docs, tok, 8, 23, lambda d: None))
    assert sum(len(c.token_ids) - 1 for c in contexts) == 23
    batches = list(iter_batches(iter(contexts), 3, True, tok.pad_token_id))
    assert sum(b.n_text_tokens for b, _ in batches) == 23
    last, _ = batches[-1]
    assert not last.counted[:, 0].any()  # BOS never counts
    assert last.counted.sum() == sum(len(c.token_ids) - 1 for c in _)


def test_display_tokens_read_back_as_the_text() -> None:
    tok = tiny_tokenizer()
    text = "café naïve — ü\n\n  <script>alert(1)</script>\tend"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    (shown,) = display_tokens(tok, [[tok.bos_token_id] + ids])
    assert shown[0] == "<bos>" and "".join(shown[1:]) == text


def test_long_txt_files_are_cut_at_blank_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from featureatlas.load import corpus
    monkeypatch.setattr(corpus, "MAX_DOCUMENT_CHARS", 30)
    text = "first paragraph here\n\nsecond one, a bit longer\n\nthird\n"
    (tmp_path / "long.txt").write_text(text)
    docs = list(iter_documents(tmp_path / "long.txt"))
    assert "".join(d.text for d in docs) == text
    assert [d.name for d in docs] == ["long.txt#part0", "long.txt#part1", "long.txt#part2"]
    assert all(len(d.text) <= 30 for d in docs)
