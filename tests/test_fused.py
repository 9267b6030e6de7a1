"""reductions.fused: torch.compile runs at the first call only, and where it cannot build, one line says so and
the eager function answers from then on."""

from __future__ import annotations

import pytest
import torch

from featureatlas.harvest import reductions


def test_compiles_at_the_first_call_and_falls_back_for_good(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    calls = []

    def broken_compile(fn, **kwargs):
        calls.append(fn)
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    double = reductions.fused(lambda x: x * 2, lambda x: x + x)
    assert calls == []  # making it compiles nothing: paths that are never called never pay for it
    assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))
    assert torch.equal(double(torch.ones(2)), torch.full((2,), 2.0))
    assert len(calls) == 1 and double.fell_back
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch.compile is unavailable here" in err and "no C++ compiler" in err
