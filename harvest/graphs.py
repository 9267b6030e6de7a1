"""CUDA graphs for the dense units' fixed-shape updates: recorded once per source and batch shape, then replayed.

On a GPU the fixed-shape updates never wait for the device, yet launching their hundred-odd small kernels a layer
from Python can take longer than the forward pass itself (bench/RESULTS.md, "GPU"); a replayed graph launches them
all at once. It is the GRAPHS backend (accumulators.py). What a graph needs:
- Fixed addresses. The hook copies each source's activations into a buffer (one per shape, shared by every
  source of that shape: the copies and replays run in order on one stream), each batch's counted mask, context
  ids and sampling keys go into buffers shared by every source, and the accumulators' state is updated in place
  (`in_place`), so every replay reads and writes the very tensors that were recorded.
- No Python state inside. Statistics.n_tokens (a Python int) is counted outside the step (Statistics.count).
- Nothing read off the GPU while recording: the fixed-shape steps never synchronise (that is their point).
Each (source, shape, padded) runs once eagerly (compiling and allocating), is recorded the next time, and replayed
from then on. A recording that fails turns graphs off for the run, with one line on stderr; the state is
left as it was before the attempt, since recording runs nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from featureatlas.harvest.batchview import BatchView

Part = object  # a TopK, Reservoir or Statistics: anything with a STATE tuple of attribute names


def in_place(parts: list[Part], update: Callable[[], None]) -> None:
    """Run update, then copy every state tensor it replaced back into the tensor that was there before: the
    state keeps its addresses, so a graph recorded around this reads and writes the same memory every replay."""
    before = _state_tensors(parts)
    update()
    for (part, name), tensor in before.items():
        after = getattr(part, name)
        if after is not tensor:
            tensor.copy_(after)
            setattr(part, name, tensor)


def _state_tensors(parts: list[Part]) -> dict[tuple[Part, str], torch.Tensor]:
    return {(part, name): getattr(part, name) for part in parts for name in part.STATE
            if isinstance(getattr(part, name), torch.Tensor)}


class GraphedUpdates:
    """update(index, acts, view, step) runs step(static acts, static view), the source's tensor-only update, as
    a replayed CUDA graph once its shape has been seen. record=False runs everything eagerly through the same
    buffers and in-place state (how the CPU tests check this path)."""

    def __init__(self, device: torch.device, record: bool = True):
        self.device = device
        self.record = record and device.type == "cuda"
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._views: dict[tuple, tuple[BatchView, BatchView | None]] = {}  # shape -> (static view, batch copied)
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._seen: set[tuple] = set()
        self._pool = torch.cuda.graph_pool_handle() if self.record else None

    def update(self, index: int, acts: torch.Tensor, view: BatchView, parts: list[Part],
               step: Callable[[torch.Tensor, BatchView], None]) -> None:
        key = (index, tuple(acts.shape), acts.dtype, view.padded, view.first_counted)
        graph = self._graphs.get(key)
        static_view = self._static_view(view)
        # One buffer per shape, shared by every source of that shape: on one stream, each copy into it runs after
        # the previous source's replay has read it.
        shape = (tuple(acts.shape), acts.dtype)
        buffer = self._buffers.get(shape)
        if buffer is None:
            buffer = self._buffers[shape] = torch.empty(acts.shape, dtype=acts.dtype, device=acts.device)
        buffer.copy_(acts)
        if graph is not None:
            graph.replay()
            return
        run = lambda: in_place(parts, lambda: step(buffer, static_view))  # noqa: E731
        if not self.record or key not in self._seen:
            self._seen.add(key)
            run()
            return
        graph = self._recorded(run, parts)
        if graph is not None:
            self._graphs[key] = graph
            graph.replay()  # recording ran nothing: this batch's update happens now

    def _recorded(self, run: Callable[[], None], parts: list[Part]) -> torch.cuda.CUDAGraph | None:
        """A graph of run; or, where recording fails, None after turning graphs off for good and running it."""
        before = _state_tensors(parts)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                run()
        except Exception as err:  # noqa: BLE001 - reported, then the same update runs without a graph
            for (part, name), tensor in before.items():
                setattr(part, name, tensor)
            self.record = False
            self._graphs.clear()
            print(f"featureatlas: recording CUDA graphs failed ({type(err).__name__}: {err}"[:300]
                  + "); harvesting without them (slower; --cuda-graphs off skips trying)", file=sys.stderr)
            torch.cuda.synchronize()
            run()
            return None
        return graph

    def _static_view(self, view: BatchView) -> BatchView:
        """This batch's view in buffers shared by every source of its shape: copied once a batch."""
        shape = tuple(view.counted.shape)
        static, copied = self._views.get(shape, (None, None))
        if static is None:
            static = BatchView(torch.empty_like(view.counted), view.first_counted, view.padded,
                               torch.empty_like(view.context_ids), torch.empty_like(view.keys), view.n_counted)
        if copied is not view:
            static.counted.copy_(view.counted)
            static.context_ids.copy_(view.context_ids)
            static.keys.copy_(view.keys)
            self._views[shape] = (static, view)
        return BatchView(static.counted, view.first_counted, view.padded, static.context_ids, static.keys,
                         view.n_counted)
