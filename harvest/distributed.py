"""`torchrun --nproc-per-node N -m featureatlas harvest …`: each rank harvests the contexts whose id is its rank
mod the world size into a shard store beside --out, then rank 0 merges the shards exactly (store/merge.py) into
--out. One GPU per local rank. Multi-node runs need --out on a filesystem every node shares, as SLURM clusters have.

The ranks share nothing but a few short messages (errors, counts, "merged"), exchanged through torchrun's
key-value store (the env:// rendezvous): no process group, so no collective's worker threads that could still
be releasing Python tensors when a rank's interpreter exits (which aborts that rank: 'terminate called without
an active exception').
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch

from featureatlas.errors import UsageError
from featureatlas.harvest.checkpoint import checkpoint_path
from featureatlas.harvest.run import HarvestConfig, HarvestSummary, harvest, validate


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def shard_store(out: Path, rank: int, world: int) -> Path:
    """Where rank `rank` writes its part (hidden, beside --out, so the merge's rename stays on one filesystem)."""
    return out.with_name(f".{out.name}.shard-{rank}-of-{world}.duckdb")


WAIT = timedelta(hours=6)  # how long a rank waits for the others (their shards, the merge)


def harvest_distributed(config: HarvestConfig) -> HarvestSummary | None:
    """Run this rank's shard, then merge on rank 0; returns the merged summary on rank 0, None elsewhere. An
    error on any rank stops every rank with that rank's message."""
    use_cuda = config.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    ranks = Ranks()
    rank, world = ranks.rank, ranks.world
    out = Path(config.out)
    try:
        error = None
        if rank == 0:
            try:
                validate(replace(config, resume=False) if config.resume else config)
            except UsageError as err:
                error = err.marked  # keeps the settings it names, for the CLI to name their flags
        error = ranks.first_error("validated", error)
        if error:
            raise UsageError(error)
        part = shard_store(out, rank, world)
        shard_config = replace(config, out=part, shard=(rank, world), overwrite=True,
                               progress=config.progress and rank == 0,
                               resume=config.resume and checkpoint_path(part).is_file())
        summary, error = None, None
        try:
            summary = harvest(shard_config)
        except Exception as err:  # noqa: BLE001 - reported by every rank, raised below
            error = f"rank {rank}: {getattr(err, 'marked', err)}"
        error = ranks.first_error("harvested", error)
        if error:
            raise UsageError(error)
        assert summary is not None
        totals = ranks.gather("totals", [summary.n_tokens, summary.n_contexts, summary.seconds])
        failed: Exception | None = None
        if rank == 0:
            from featureatlas.store.merge import merge_stores

            parts = [shard_store(out, r, world) for r in range(world)]
            try:
                merge_stores(parts, out, overwrite=config.overwrite)
            except Exception as err:  # noqa: BLE001 - raised below, once every rank knows
                failed, error = err, f"rank 0, merging the shards: {getattr(err, 'marked', err)}"
            else:
                for path in parts:
                    path.unlink(missing_ok=True)
        error = ranks.first_error("merged", error if failed else None)  # every rank waits for the merge
        if failed is not None:
            raise failed
        if error:
            raise UsageError(error)
        if rank != 0:
            return None
        n_tokens, n_contexts = sum(t[0] for t in totals), sum(t[1] for t in totals)
        seconds = max(t[2] for t in totals)
        return HarvestSummary(out, summary.n_units, n_tokens, n_contexts, seconds, n_tokens / max(seconds, 1e-9))
    finally:
        ranks.leave()


class Ranks:
    """This process's rank among torchrun's, and messages exchanged with the others through the rendezvous's
    key-value store (keys under featureatlas/ and the restart count, so a restarted group never reads an old
    attempt's)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        store, self.rank, self.world = next(dist.rendezvous("env://", timeout=WAIT))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"featureatlas/{restart}/", store)

    def gather(self, name: str, value: object) -> list:
        """Every rank's value (JSON), in rank order, once every rank has given its own."""
        self.store.set(f"{name}/{self.rank}", json.dumps(value))
        keys = [f"{name}/{r}" for r in range(self.world)]
        self.store.wait(keys, WAIT)
        return [json.loads(self.store.get(key)) for key in keys]

    def first_error(self, name: str, error: str | None) -> str | None:
        """Every rank learns the first rank's error (or None): they all stop together instead of waiting forever."""
        return next((e for e in self.gather(name, error) if e), None)

    def leave(self) -> None:
        """Rank 0 leaves last: where it hosts the store (a launch without torchrun's agent), the others may still be
        reading it."""
        self.store.set(f"left/{self.rank}", "")
        if self.rank == 0:
            self.store.wait([f"left/{r}" for r in range(self.world)], WAIT)
