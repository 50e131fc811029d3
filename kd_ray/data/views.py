"""Replayable training views: view ``v`` of sample ``i`` is the same image in every process.

The teacher cache stores the teacher's logits for K such views per image; distillation then
replays exactly those views, so student and teacher always see the same pixels. A view is made
by running the ordinary (random) training transform under a seed derived from
(seed, view, sample), so any torchvision transform pipeline replays without changes.

Datasets here take a *flat id* ``v * N + i``; ``ViewSampler`` picks the view of each sample per
epoch (each of the K views once every K epochs, in a per-sample order).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


def view_seed(seed: int, view: int, index: int) -> int:
    """A 63-bit seed per (seed, view, sample); independent of process, rank and epoch."""
    mixed = np.random.SeedSequence([seed, view, index]).generate_state(2, dtype=np.uint32)
    return int(mixed[0]) << 31 ^ int(mixed[1])


class ReplayViews(Dataset):
    """``base[i]`` under the seed of view ``v``; items ``(image, label, sample, view)``.

    ``views == 1`` without augmentation: the transform is deterministic, no seeding needed.
    """

    def __init__(self, base, views: int, seed: int):
        self.base, self.views, self.seed = base, views, seed

    def __len__(self) -> int:
        return len(self.base)

    def split(self, flat: int) -> tuple[int, int]:
        n = len(self.base)
        return flat % n, flat // n

    def image(self, index: int, view: int):
        if self.views == 1:
            return self.base[index]
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG stream untouched
            torch.manual_seed(view_seed(self.seed, view, index))
            return self.base[index]

    def __getitem__(self, flat: int):
        index, view = self.split(int(flat))
        image, label = self.image(index, view)
        return image, label, index, view


class CachedViews(ReplayViews):
    """Training items ``(image, label, teacher_logits)`` with logits read from a cache."""

    def __init__(self, base, logits, seed: int):
        super().__init__(base, logits.views, seed)
        self.logits = logits
        if logits.samples != len(base):
            raise ValueError(f"teacher cache holds {logits.samples} samples, the dataset {len(base)}")

    def __getitem__(self, flat: int):
        index, view = self.split(int(flat))
        image, label = self.image(index, view)
        return image, label, self.logits.row(index, view)


class ViewSampler(DistributedSampler):
    """A ``DistributedSampler`` that yields flat ids: the view of sample i changes every epoch."""

    def __init__(self, dataset, views: int, view_seed: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.views = views
        # A per-sample offset, so that not every sample uses view 0 in the same epoch.
        self.offsets = np.random.default_rng(view_seed).integers(views, size=len(dataset))

    def view_of(self, index: int) -> int:
        return int((self.offsets[index] + self.epoch) % self.views)

    def __iter__(self):
        n = len(self.dataset)
        for index in super().__iter__():
            yield self.view_of(index) * n + index
