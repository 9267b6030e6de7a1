"""The TRITON backend's kernels compiled for NVIDIA GPUs on a machine that has none.

Triton's interpreter (tests/test_triton_kernels.py) runs the kernels' Python, and accepts what the compiler refuses
(a loop-carried value changing type, a block too large for a GPU's registers). Here each launch kernels.py makes
for a real batch is recorded instead of run, and compiled from its arguments (typed as Triton types them at
launch) to a cubin for an H100/H200 (sm_90) with the ptxas that ships with Triton, for dense and dictionary units.
Skipped where Triton or its NVIDIA backend is not installed.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from featureatlas.harvest import kernels
from featureatlas.harvest.batchview import BatchView
from featureatlas.harvest.reservoir import Reservoir
from featureatlas.harvest.statistics import Statistics
from featureatlas.harvest.topk import TopK

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install -e .[test] on Linux x86-64)")
compiler = pytest.importorskip("triton.compiler")
backend = pytest.importorskip("triton.backends.compiler")
pytestmark = pytest.mark.slow

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
          torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}
CPU = torch.device("cpu")
LAUNCH_OPTIONS = ("num_warps", "num_stages")  # a launch's keywords that are not the kernel's constexprs


def launches(dtype: torch.dtype, batch: int, sparse: bool, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """(kernel, positional arguments, constexprs) of every launch one update makes: the fused pass, the top list's
    merge (and the bottom list's, for dense units) and the samples' merge, for [batch, 64 tokens, 1536 units]."""
    from featureatlas.harvest import triton_kernels

    made: list[tuple] = []

    class Recorded:
        def __init__(self, kernel: object):
            self.kernel = kernel

        def __getitem__(self, grid: tuple) -> object:
            return lambda *args, **constexprs: made.append((self.kernel, args, constexprs))

    recording = SimpleNamespace(**{name: Recorded(getattr(triton_kernels, name))
                                   for name in ("fused_pass", "merge_candidates", "merge_samples")})
    monkeypatch.setattr(kernels, "_module", lambda importing=True: (recording, False))
    tokens, units = 64, 1536
    acts = torch.zeros((batch, tokens, units), dtype=dtype)
    view = BatchView(torch.ones((batch, tokens), dtype=torch.bool), 1, False, torch.arange(batch),
                     torch.arange(batch), batch * tokens)
    top = TopK(units, 20, tokens, CPU, dtype)
    bottom = None if sparse else TopK(units, 20, tokens, CPU, dtype)
    scratch = kernels.Candidates(), kernels.Candidates()
    passed = kernels.fused_pass(acts, view, Statistics(units, CPU, sparse, 32), top, scratch[0], bottom,
                                scratch[1] if bottom is not None else None)  # recorded: its outputs stay empty
    kernels.merge(top, scratch[0], acts, view, passed)
    if bottom is not None:
        kernels.merge(bottom, scratch[1], acts, view, passed, largest=False)
    for samples in (Reservoir(units, 10, 10, tokens, CPU, dtype), Reservoir(units, 1, 20, tokens, CPU, dtype)):
        kernels.merge_samples(samples, acts, view, passed, sparse)
    return made


def signature(kernel: object, args: tuple, constexprs: dict) -> dict[str, str]:
    """Each argument's Triton type, as a launch gives it: tensors as pointers to their dtype, integers as i32 where
    they fit (strides and sizes here always do), the keyword arguments as constexprs."""
    types = {}
    for name, value in zip(kernel.arg_names, args, strict=False):
        if isinstance(value, torch.Tensor):
            types[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            types[name] = "i1"
        else:
            assert isinstance(value, int), (name, value)
            types[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
    return types | {name: "constexpr" for name in constexprs}


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "dictionary"])
def test_every_launch_compiles_for_the_gpu(sparse: bool, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """bfloat16 batches of 64 x 64 for an H100/H200 (each launch takes seconds to compile: bench/device_check.py
    compiles the rest on the GPU). Of a dictionary's launches, only the fused pass differs beyond a constant from
    the dense units' (its merges are theirs with SPARSE changing one constant): the rest is not compiled twice."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compiled here, not found in a cache
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    made = launches(torch.bfloat16, 64, sparse, monkeypatch)
    assert [kernel.__name__ for kernel, _, _ in made] == (
        ["fused_pass"] + ["merge_candidates"] * (1 if sparse else 2) + ["merge_samples"] * 2)
    for kernel, args, keywords in made:
        if sparse and kernel.__name__ != "fused_pass":
            continue
        options = {name: keywords.pop(name) for name in LAUNCH_OPTIONS if name in keywords}
        source = compiler.ASTSource(kernel, signature(kernel, args, keywords), keywords)
        try:
            compiled = triton.compile(source, target=backend.GPUTarget("cuda", 90, 32), options=options)
        except (FileNotFoundError, RuntimeError) as err:  # a Triton without NVIDIA's ptxas
            if "ptxas" in str(err):
                pytest.skip(f"Triton cannot compile for NVIDIA GPUs here: {err}")
            raise
        assert len(compiled.asm["cubin"]) > 1000, kernel.__name__
        assert compiled.metadata.num_warps == options.get("num_warps", 4)
