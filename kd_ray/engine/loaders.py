"""Data loaders of one DDP rank, and counters summed across ranks (plain torch.distributed)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from kd_ray.data.sampling import ShuffleSampler
from kd_ray.data.views import CachedViews, Indexed


def make_loaders(bundle, batch_size: int, rank: int, world: int, seed: int, workers: int,
                 with_index: bool = False):
    """Shuffled, sharded training loader and an exact (unpadded) validation shard. ``with_index``:
    training batches end with ``{"index": positions}`` (``data.views.Indexed``)."""
    per_worker = max(1, batch_size // world)
    views, view_seed = 1, 0
    if isinstance(bundle.train, CachedViews):  # yields (view, sample) ids, a new view each epoch
        views, view_seed = bundle.train.views, bundle.train.seed
    # Row-group aware for Parquet tables: each rank reads a contiguous share, each group once.
    sampler = ShuffleSampler(bundle.train, views, view_seed, num_replicas=world, rank=rank,
                             shuffle=True, seed=seed)
    # drop_last keeps BatchNorm away from 1-image batches; tiny sets keep their only batch.
    drop_last = len(sampler) > per_worker
    dataset = Indexed(bundle.train) if with_index else bundle.train
    train = DataLoader(dataset, batch_size=per_worker, sampler=sampler, drop_last=drop_last,
                       num_workers=workers, persistent_workers=workers > 0)
    return train, sampler, shard_loader(bundle.val, rank, world, per_worker * 2, workers)


def shard_loader(dataset, rank: int, world: int, batch_size: int, workers: int = 0) -> DataLoader:
    """This rank's contiguous share of an evaluation split. Every image is seen exactly once across
    ranks, so summed counts give exact accuracy; contiguous, so that a rank reads only its own row
    groups of a Parquet table."""
    n = len(dataset)
    shard = Subset(dataset, range(rank * n // world, (rank + 1) * n // world))
    return DataLoader(shard, batch_size=batch_size, num_workers=workers)


def all_sum(values: dict, device: torch.device, max_keys=("seconds",)) -> dict:
    """Add counters across ranks (wall seconds take the slowest rank); list values (per-class
    counts) are added element-wise."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    lists = {k: v for k, v in values.items() if isinstance(v, list)}
    values = {k: v for k, v in values.items() if k not in lists}
    if lists:
        flat = torch.tensor([float(x) for v in lists.values() for x in v], dtype=torch.float64, device=device)
        dist.all_reduce(flat)
        at, flat = 0, flat.tolist()
        for k, v in lists.items():
            lists[k], at = [int(x) for x in flat[at:at + len(v)]], at + len(v)
    keys = sorted(values)
    summed = [k for k in keys if k not in max_keys]
    maxed = [k for k in keys if k in max_keys]
    out = {}
    for names, op in ((summed, dist.ReduceOp.SUM), (maxed, dist.ReduceOp.MAX)):
        if not names:
            continue
        t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op)
        out.update(zip(names, t.tolist()))
    return {**out, **lists}
