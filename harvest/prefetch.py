"""Batches made on a helper thread while the model runs the previous ones.

Reading the corpus, tokenising (the Rust tokenizer releases the GIL) and padding cost little beside a forward
pass on a CPU, but a large share of a small model's forward on a GPU, which would otherwise wait for them
(bench/RESULTS.md, "CPU components").
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()
JOIN_SECONDS = 30.0


def prefetched(items: Iterable[T], ahead: int = 2) -> Iterator[T]:
    """The items, in order, made up to `ahead` in advance on a helper thread. An error making one is raised
    here, where that item would have come; closing this iterator early (a break, an error in the caller's loop)
    stops the helper once it finishes the item in hand (waiting for that at most JOIN_SECONDS: the helper is a
    daemon thread, so a process that is exiting anyway does not wait for a huge document's tokenising)."""
    ready: queue.Queue = queue.Queue(ahead)
    stop = threading.Event()

    def put(entry: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def make() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            put((_END, err))

    helper = threading.Thread(target=make, name="featureatlas-batches", daemon=True)
    helper.start()
    try:
        while True:
            item, err = ready.get()
            if item is _END:
                if err is not None:
                    raise err
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        helper.join(JOIN_SECONDS)
