"""The training order of one DDP rank: shuffled per epoch, exact and reproducible, row-group aware.

Datasets read by row group (Parquet tables) expose ``row_groups()``, the row group of every item.
Their epoch order keeps row groups together: the groups in a random order, and the items of each
``window`` consecutive groups shuffled among themselves. A reader whose LRU holds ``window`` row
groups then reads every group once per epoch, and never more than ``window`` at a time. Datasets
without row groups (image folders, in-memory tensors) get a full random permutation.

The order depends only on (seed, epoch, the dataset's size and row groups): a restarted run
replays it exactly. The padded order is cut into ``world`` contiguous slices of equal length, so
each rank reads distinct rows (bar the padding, as ``DistributedSampler``) and a contiguous run of
row groups. This replaces ``DistributedSampler`` (whose order lives in a Python list of n ints).
"""
from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Sampler

WINDOW = 4  # row groups shuffled together; readers keep as many (parquet.CACHED_GROUPS)


def item_groups(dataset) -> np.ndarray | None:
    """The row group of each item, or None for datasets read by random access."""
    groups = getattr(dataset, "row_groups", None)
    return groups() if callable(groups) else None


def by_group(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(items sorted by row group, where each group starts in that list): computed once."""
    items = np.argsort(groups, kind="stable").astype(np.int32 if len(groups) < 2**31 else np.int64)
    return items, np.concatenate([[0], np.cumsum(np.bincount(groups))])


def epoch_order(n: int, groups, seed: int, epoch: int, window: int = WINDOW) -> np.ndarray:
    """A permutation of range(n) for this (seed, epoch); ``groups``: the row group of each item,
    or ``by_group``'s pair for it, or None."""
    rng = np.random.default_rng([seed, epoch])
    if groups is None:
        return rng.permutation(n)
    items, starts = by_group(groups) if isinstance(groups, np.ndarray) else groups
    order, at = np.empty(n, dtype=items.dtype), 0
    picked = rng.permutation(len(starts) - 1)
    for w in range(0, len(picked), window):
        members = np.concatenate([items[starts[g]:starts[g + 1]] for g in picked[w:w + window]])
        rng.shuffle(members)
        order[at:at + len(members)] = members
        at += len(members)
    return order


class ShuffleSampler(Sampler):
    """Flat ids ``view * n + index`` of this rank's share; the view of sample i changes each epoch.

    ``views == 1``: plain indices. Same keyword arguments as ``DistributedSampler``.
    """

    def __init__(self, dataset, views: int = 1, view_seed: int = 0, *, num_replicas: int = 1,
                 rank: int = 0, shuffle: bool = True, seed: int = 0, window: int = WINDOW):
        self.dataset, self.views = dataset, views
        self.n = len(dataset)
        self.world, self.rank, self.shuffle, self.seed, self.window = num_replicas, rank, shuffle, seed, window
        self.num_samples = math.ceil(self.n / num_replicas)
        self.epoch, self.skip = 0, 0
        groups = item_groups(dataset) if shuffle else None
        self.groups = None if groups is None else by_group(groups)
        # A per-sample offset, so that not every sample uses view 0 in the same epoch.
        self.offsets = (np.random.default_rng(view_seed).integers(views, size=self.n, dtype=np.int16)
                        if views > 1 else None)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """``skip``: leave out this rank's first ``skip`` samples of the epoch (a run resumed
        inside it: the same order, without loading the images already trained on)."""
        self.epoch, self.skip = epoch, skip

    def indices(self) -> np.ndarray:
        """This rank's sample indices for the epoch, in order."""
        order = (epoch_order(self.n, self.groups, self.seed, self.epoch, self.window) if self.shuffle
                 else np.arange(self.n))
        total = self.num_samples * self.world
        if total > self.n:  # pad with the order's start, so that every rank gets as many
            order = np.resize(order, total)
        return order[self.rank * self.num_samples:(self.rank + 1) * self.num_samples]

    def __iter__(self):
        mine = self.indices()[self.skip:]
        for start in range(0, len(mine), 4096):  # small lists: n Python ints would cost 36 B each
            chunk = mine[start:start + 4096]
            if self.offsets is not None:
                chunk = ((self.offsets[chunk] + self.epoch) % self.views).astype(np.int64) * self.n + chunk
            yield from chunk.tolist()

    def __len__(self) -> int:
        return self.num_samples - self.skip
