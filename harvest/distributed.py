"""`torchrun --nproc-per-node N -m featureatlas harvest …`: each rank harvests the contexts whose id is its rank
mod the world size into a shard store beside --out, then rank 0 merges the shards exactly (store/merge.py) into
--out. gloo on CPU, nccl on GPU (one GPU per local rank). Multi-node runs need --out on a filesystem every node
shares, as SLURM clusters have.
"""

from __future__ import annotations

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


def harvest_distributed(config: HarvestConfig) -> HarvestSummary | None:
    """Run this rank's shard, then merge on rank 0; returns the merged summary on rank 0, None elsewhere. An
    error on any rank stops every rank with that rank's message."""
    import torch.distributed as dist

    use_cuda = config.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=6))
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(config.out)
    try:
        error = None
        if rank == 0:
            try:
                validate(replace(config, resume=False) if config.resume else config)
            except UsageError as err:
                error = err.marked  # keeps the settings it names, for the CLI to name their flags
        error = _first_error(dist, error)
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
        error = _first_error(dist, error)
        if error:
            raise UsageError(error)
        assert summary is not None
        totals: list = [None] * world
        dist.all_gather_object(totals, (summary.n_tokens, summary.n_contexts, summary.seconds))
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
        # every rank waits for the merge and leaves with the others (none tears its process group down early)
        error = _first_error(dist, error if failed else None)
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
        dist.destroy_process_group()


def _first_error(dist: object, error: str | None) -> str | None:
    """Every rank learns the first rank's error (or None): they all stop together instead of waiting forever."""
    errors: list[str | None] = [None] * dist.get_world_size()  # type: ignore[attr-defined]
    dist.all_gather_object(errors, error)  # type: ignore[attr-defined]
    return next((e for e in errors if e), None)



