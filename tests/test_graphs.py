"""What a recorded CUDA graph needs of the dense units' updates, checked on the CPU (graphs.py): a replay reruns
the recorded kernels on the recorded addresses and nothing else, so the update must keep every state tensor where
it was, read the batch only through the static buffers, and change no Python state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from featureatlas.harvest.accumulators import Accumulators, Backend, FixedShapes, Settings, make_accumulators
from featureatlas.harvest.batchview import BatchView
from featureatlas.harvest.graphs import GraphedUpdates
from featureatlas.store.sampling import sampling_keys

BATCH, TOKENS, UNITS = 6, 16, 24


def _batches(n: int, padded_last: bool = True) -> list[tuple[torch.Tensor, BatchView]]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        acts = torch.randn((BATCH, TOKENS, UNITS), generator=gen) * (1 + i)  # ranges grow: samples re-bin
        counted = torch.ones((BATCH, TOKENS), dtype=torch.bool)
        counted[:, 0] = False
        padded = padded_last and i == n - 1
        if padded:
            counted[-1, TOKENS // 2:] = False
        ids = torch.arange(i * BATCH, (i + 1) * BATCH)
        keys = torch.from_numpy(sampling_keys(ids.numpy(), 3))
        out.append((acts, BatchView(counted, 1, padded, ids, keys, int(counted.sum()))))
    return out


SETTINGS = Settings(top_k=4, bottom_k=4, intervals=4, per_interval=2, random=2, histogram_every=2,
                    backend=Backend.FIXED)


def _accumulators() -> FixedShapes:
    source = SimpleNamespace(n_units=UNITS, sparse=False, signed=True)
    made = make_accumulators([source], SETTINGS, TOKENS, torch.device("cpu"), [torch.float32])  # type: ignore
    assert isinstance(made[0], FixedShapes)
    return made[0]


def _python_state(acc: Accumulators) -> dict:
    return {(name, key): value for name, part in acc.parts().items() for key, value in vars(part).items()
            if not isinstance(value, torch.Tensor) and not callable(value)}


def test_graphed_updates_keep_state_in_place_and_equal_the_plain_updates() -> None:
    plain, graphed, graphs = _accumulators(), _accumulators(), GraphedUpdates(torch.device("cpu"))
    addresses = None
    with torch.inference_mode():
        for acts, view in _batches(5):
            plain.update(acts, view)
            graphed.statistics.count(view)
            python_before = _python_state(graphed)
            graphs.update(0, acts.clone(), view, list(graphed.parts().values()), graphed.step)
            assert _python_state(graphed) == python_before  # nothing a replay would skip
            now = {(name, key): getattr(part, key).data_ptr() for name, part in graphed.parts().items()
                   for key in part.STATE if isinstance(getattr(part, key), torch.Tensor)}
            assert addresses is None or now == addresses  # every replay writes where the recording did
            addresses = now
    for name, part in plain.parts().items():
        for key in part.STATE:
            want, got = getattr(part, key), getattr(graphed.parts()[name], key)
            assert torch.equal(torch.as_tensor(want), torch.as_tensor(got)), f"{name}.{key}"
    assert plain.statistics.n_tokens == graphed.statistics.n_tokens > 0


def test_graphed_updates_read_each_batch_through_the_static_buffers() -> None:
    """The step sees the same tensors every batch, holding that batch's values."""
    graphs, seen = GraphedUpdates(torch.device("cpu")), []

    def step(acts: torch.Tensor, view: BatchView) -> None:
        seen.append((acts.data_ptr(), view.counted.data_ptr(), view.context_ids.data_ptr(), view.keys.data_ptr(),
                     acts.sum().item(), view.context_ids.tolist()))

    batches = _batches(3, padded_last=False)
    for acts, view in batches:
        graphs.update(0, acts, view, [], step)
    assert len({s[:4] for s in seen}) == 1
    assert [s[5] for s in seen] == [v.context_ids.tolist() for _, v in batches]
    assert [s[4] for s in seen] == [acts.sum().item() for acts, _ in batches]


def test_a_failed_recording_says_so_once_and_goes_on_without_graphs(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Where recording fails (a host sync, an old driver), the batch's update still runs, once, and the run goes
    on eagerly through the same buffers: the same state as the plain updates."""
    class NeverReplayed:
        def replay(self) -> None:
            raise AssertionError("a failed recording must not be replayed")

    class FailingRecording:
        def __init__(self, graph: object, pool: object = None, capture_error_mode: str = "global"):
            pass

        def __enter__(self) -> None:
            raise RuntimeError("operation not permitted when stream is capturing")

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", NeverReplayed)
    monkeypatch.setattr(torch.cuda, "graph", FailingRecording)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    plain, graphed, graphs = _accumulators(), _accumulators(), GraphedUpdates(torch.device("cpu"))
    graphs.record = True  # as on CUDA: the second batch of a shape is recorded
    with torch.inference_mode():
        for acts, view in _batches(4):
            plain.update(acts, view)
            graphed.statistics.count(view)
            graphs.update(0, acts, view, list(graphed.parts().values()), graphed.step)
    assert not graphs.record
    lines = [line for line in capsys.readouterr().err.splitlines() if "CUDA graphs" in line]
    assert len(lines) == 1 and "capturing" in lines[0] and "--cuda-graphs off" in lines[0]
    for name, part in plain.parts().items():
        for key in part.STATE:
            want, got = getattr(part, key), getattr(graphed.parts()[name], key)
            assert torch.equal(torch.as_tensor(want), torch.as_tensor(got)), f"{name}.{key}"


def test_the_graphs_backend_shares_one_set_of_graphs_between_dense_sources() -> None:
    """One set of buffers and graphs for the run, each dense source its own key; sparse sources are not graphed."""
    dense, sparse = (SimpleNamespace(n_units=UNITS, sparse=kind, signed=not kind) for kind in (False, True))
    settings = Settings(**{**vars(SETTINGS), "backend": Backend.GRAPHS})
    made = make_accumulators([dense, sparse, dense], settings, TOKENS, torch.device("cpu"),  # type: ignore
                             [torch.float32] * 3)
    assert [type(a).__name__ for a in made] == ["Graphed", "TensorPairs", "Graphed"]
    assert made[0].graphs is made[2].graphs and (made[0].key, made[2].key) == (0, 2)
    assert not made[0].graphs.record  # on a CPU the graphs' path runs eagerly
