"""Checkpoints: a harvest's whole state, saved atomically every N tokens, so that `--resume` after a crash (even
`kill -9`, even mid-save) continues where the last checkpoint left off and writes the very store an uninterrupted
run would have written.

A checkpoint holds the options that shape the result (a resume with different ones is refused, naming the
difference), how many contexts were consumed, the elapsed time, and every accumulator's STATE tensors (TopK,
Reservoir, Statistics list theirs). Contexts are not saved: a resume reads the corpus again up to where it
stopped, keeping the contexts the restored examples refer to, and runs no forward pass on them. Batches start at
the same contexts as before, so every later batch, and so every result, is the same.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from featureatlas.atomic import remove_stale_temps, temp_path_beside
from featureatlas.errors import UsageError

VERSION = 1
# Options that do not change what a harvest computes (the same results either way): a resume may differ in these.
_FREE = {"progress", "resume", "overwrite", "checkpoint_every", "out", "fixed_shapes", "cuda_graphs", "native"}


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint")


def shaping_options(config: object) -> dict[str, Any]:
    """The harvest options that shape the result, as plain values (what a checkpoint and a run record)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items() if k not in _FREE}


class Checkpointer:
    """Saves every `every` tokens (None: never); the file is replaced atomically, so a kill leaves the previous
    checkpoint whole."""

    def __init__(self, out: Path, every: int | None):
        self.path = checkpoint_path(Path(out))
        self.every = every
        self._next = every
        remove_stale_temps(self.path)  # a save that a kill -9 interrupted left its partial file behind

    def due(self, n_tokens: int) -> bool:
        return self._next is not None and n_tokens >= self._next

    def save(self, config: object, accumulators: list, n_contexts: int, n_tokens: int, elapsed: float,
             started_at: datetime) -> None:
        state = {"version": VERSION, "options": shaping_options(config), "n_contexts": n_contexts,
                 "n_tokens": n_tokens, "elapsed": elapsed, "started_at": started_at, "saved_at": time.time(),
                 "accumulators": [{name: {attr: _cpu(getattr(part, attr)) for attr in part.STATE}
                                   for name, part in acc.parts().items()} for acc in accumulators]}
        temp = temp_path_beside(self.path)
        torch.save(state, temp)
        os.replace(temp, self.path)
        if self.every is not None:
            self._next = n_tokens + self.every

    def load(self, config: object, accumulators: list) -> dict[str, Any]:
        """Restore the accumulators from the checkpoint; returns its counters. Refuses a checkpoint of other
        options, naming the first that differs."""
        if not self.path.is_file():
            raise UsageError(f"{self.path}: no checkpoint to resume from; run without --resume (a checkpoint is "
                             "written every --checkpoint-every tokens)")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
            raise UsageError(f"{self.path}: unreadable checkpoint ({err}); remove it and harvest again") from None
        if state.get("version") != VERSION:
            raise UsageError(f"{self.path}: checkpoint of another featureatlas version; remove it and harvest again")
        options = shaping_options(config)
        for name in sorted(set(options) | set(state["options"])):
            if options.get(name) != state["options"].get(name):
                raise UsageError(f"{self.path}: was written with --{name.replace('_', '-')} "
                                 f"{state['options'].get(name)!r}, not {options.get(name)!r}; resume with the same "
                                 "options, or remove the checkpoint to start again")
        if len(state["accumulators"]) != len(accumulators):
            raise UsageError(f"{self.path}: holds {len(state['accumulators'])} sources, this run has "
                             f"{len(accumulators)}; resume with the same model and options")
        for acc, saved in zip(accumulators, state["accumulators"], strict=True):
            for name, part in acc.parts().items():
                for attr in part.STATE:
                    _restore(part, attr, saved[name][attr])
        if self.every is not None:
            self._next = state["n_tokens"] + self.every
        return state

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _cpu(value: Any) -> Any:
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


def _restore(part: object, attr: str, value: Any) -> None:
    current = getattr(part, attr)
    if isinstance(current, torch.Tensor):
        if current.shape != value.shape:
            raise UsageError(f"checkpoint: {attr} has shape {tuple(value.shape)}, this run {tuple(current.shape)}; "
                             "resume with the same model and options")
        current.copy_(value.to(current.device))
    else:
        setattr(part, attr, value)
