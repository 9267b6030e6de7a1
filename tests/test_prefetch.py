"""prefetched(): the same items in order, errors where they happened, and an early stop that ends the helper."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from featureatlas.harvest.prefetch import prefetched


def test_gives_every_item_in_order_made_on_another_thread() -> None:
    makers: set[str] = set()

    def items() -> Iterator[int]:
        for i in range(50):
            makers.add(threading.current_thread().name)
            yield i

    assert list(prefetched(items(), ahead=3)) == list(range(50))
    assert makers == {"featureatlas-batches"}


def test_an_error_comes_where_its_item_would_have() -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("corpus.jsonl: line 3 is not JSON")

    got = []
    with pytest.raises(ValueError, match="line 3"):
        for item in prefetched(items()):
            got.append(item)
    assert got == [1, 2]


def test_stopping_early_stops_the_helper() -> None:
    made = []

    def items() -> Iterator[int]:
        for i in range(10_000):
            made.append(i)
            yield i

    with pytest.raises(RuntimeError):
        for item in prefetched(items(), ahead=2):
            if item == 5:
                raise RuntimeError("the caller's own error")
    assert not any(t.name == "featureatlas-batches" for t in threading.enumerate())  # joined on close
    assert len(made) <= 5 + 1 + 2 + 1  # at most `ahead` made beyond the one in hand, plus the one being put
