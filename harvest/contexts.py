"""Cuts documents into fixed-length model contexts and batches them.

Deliberate choices (recorded in the store's `runs` table):
- a context never spans two documents; a document longer than one context is cut into consecutive pieces,
  and its last piece is shorter (batches pad it, and padding never counts);
- every context starts with the tokenizer's BOS token when it has one, and the BOS position never counts as
  a context's max (it is a well-known attention sink whose activations dwarf the rest);
- `--tokens N` stops after exactly N text tokens (BOS and padding are not counted);
- a pre-tokenised document (token ids read from the corpus) is cut the same way, its ids used as is; a BOS it
  starts with is dropped, since every context gets its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from featureatlas.load.corpus import CorpusError, Document

if TYPE_CHECKING:  # for type hints only: importing them takes seconds
    from transformers import PreTrainedTokenizerBase

_DECODE_WINDOW = 4  # tokens of left context used to decode one token's display string (a UTF-8 char <= 4 bytes)
_INCOMPLETE = "\ufffd"  # what decoders make of the bytes of a character whose last byte is yet to come


@dataclass(frozen=True)
class Context:
    context_id: int
    document_id: int
    start_token: int           # offset of the first text token in its document
    token_ids: list[int]       # BOS included


@dataclass(frozen=True)
class DocumentInfo:
    document_id: int
    name: str
    n_tokens: int


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor    # [batch, tokens], right-padded
    counted: torch.Tensor      # [batch, tokens]: positions that may be a context's max
    lengths: torch.Tensor      # [batch]: real tokens per context, BOS included
    context_ids: torch.Tensor  # [batch]
    n_text_tokens: int

    @property
    def padded(self) -> bool:
        return bool((self.lengths < self.input_ids.shape[1]).any())

    def pinned(self) -> Batch:
        """The same batch in page-locked host memory, whose copies to a GPU (non_blocking) do not wait."""
        return replace(self, input_ids=self.input_ids.pin_memory(), counted=self.counted.pin_memory(),
                       context_ids=self.context_ids.pin_memory())


def iter_contexts(documents: Iterable[Document], tokenizer: PreTrainedTokenizerBase, context_length: int,
                  max_tokens: int | None, on_document: Callable[[DocumentInfo], None]) -> Iterator[Context]:
    """Contexts in corpus order; calls on_document(DocumentInfo) for each document that was used."""
    bos = tokenizer.bos_token_id
    body = context_length - (1 if bos is not None else 0)
    prefix = [bos] if bos is not None else []
    budget = max_tokens if max_tokens is not None else float("inf")
    context_id = 0
    for document_id, document in enumerate(documents):
        if budget <= 0:
            return
        ids = _token_ids(document, tokenizer)
        ids = ids[: int(min(len(ids), budget))]
        if not ids:
            continue
        budget -= len(ids)
        on_document(DocumentInfo(document_id, document.name, len(ids)))
        for start in range(0, len(ids), body):
            yield Context(context_id, document_id, start, prefix + ids[start : start + body])
            context_id += 1


def _token_ids(document: Document, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The document's text tokens: tokenized, or its pre-tokenised ids checked against the vocabulary (an id
    from another tokenizer would index past the embedding matrix)."""
    if document.token_ids is None:
        return tokenizer(document.text, add_special_tokens=False)["input_ids"]
    ids = document.token_ids
    if ids and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    if ids and (min(ids) < 0 or max(ids) >= len(tokenizer)):
        bad = min(ids) if min(ids) < 0 else max(ids)
        raise CorpusError(f"{document.name}: token id {bad} is outside this tokenizer's vocabulary "
                          f"(0-{len(tokenizer) - 1}); the ids were made with another tokenizer: pass the text, or "
                          "ids made with this model's tokenizer")
    return ids


def iter_batches(contexts: Iterable[Context], batch_size: int, has_bos: bool, pad_id: int
                 ) -> Iterator[tuple[Batch, list[Context]]]:
    pending: list[Context] = []
    for context in contexts:
        pending.append(context)
        if len(pending) == batch_size:
            yield make_batch(pending, has_bos, pad_id), pending
            pending = []
    if pending:
        yield make_batch(pending, has_bos, pad_id), pending


def make_batch(contexts: list[Context], has_bos: bool, pad_id: int) -> Batch:
    lengths = torch.tensor([len(c.token_ids) for c in contexts])
    width = int(lengths.max())
    input_ids = torch.full((len(contexts), width), pad_id, dtype=torch.int64)
    for row, context in enumerate(contexts):
        input_ids[row, : len(context.token_ids)] = torch.tensor(context.token_ids)
    counted = torch.arange(width)[None, :] < lengths[:, None]
    if has_bos:
        counted[:, 0] = False
    return Batch(input_ids, counted, lengths, torch.tensor([c.context_id for c in contexts]),
                 int(lengths.sum()) - (len(contexts) if has_bos else 0))


def display_tokens(tokenizer: PreTrainedTokenizerBase, token_ids: list[list[int]]) -> list[list[str]]:
    """Each token's text as it reads in place, so that a context's display strings join up to its text.

    A token's string is the decoded window ending at it minus the decoded window ending just before it (a few
    tokens of left context get SentencePiece's leading spaces right without decoding whole contexts once per
    token). A character split over several byte-level tokens belongs to the token that completes it; the
    tokens before hold only part of its bytes and read as "".
    """
    windows: list[list[int]] = []
    for ids in token_ids:
        for i in range(len(ids)):
            lo = max(0, i - _DECODE_WINDOW)
            windows.append(ids[lo : i + 1])
            windows.append(ids[lo:i])
    decoded = [text.rstrip(_INCOMPLETE) for text in tokenizer.batch_decode(
        windows, skip_special_tokens=False, clean_up_tokenization_spaces=False)]
    result, at = [], 0
    for ids in token_ids:
        row = []
        for _ in ids:
            with_token, without = decoded[at], decoded[at + 1]
            at += 2
            row.append(with_token[len(without):] if with_token.startswith(without) else with_token)
        result.append(row)
    return result
