"""Replayable training views: view ``v`` of sample ``i`` is the same image in every process.

The teacher cache stores the teacher's logits for K such views per image; distillation then
replays exactly those views, so student and teacher always see the same pixels. A view is made
by running the ordinary (random) training transform under a seed derived from
(seed, view, sample), so any torchvision transform pipeline replays without changes.

Datasets here take a *flat id* ``v * N + i``; ``ViewSampler`` picks the view of each sample per
epoch (each of the K views once every K epochs, in a per-sample order).

Seeding is per item, so it must be cheap: a splitmix64 hash (< 1 us) and the CPU generator's own
``manual_seed`` with its state saved and restored (~3 us). ``torch.manual_seed`` and
``fork_rng`` cost ~0.2 ms here, as they also seed (or check) every accelerator backend.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from kd_ray.data.sampling import ShuffleSampler, item_groups

MASK = (1 << 64) - 1


def view_seed(seed: int, view: int, index: int) -> int:
    """A 63-bit seed per (seed, view, sample) (splitmix64); independent of process, rank, epoch."""
    z = (seed * 0x9E3779B97F4A7C15 + view * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB
         + 0x632BE59BD9B4E019) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return (z ^ (z >> 31)) >> 1


class ReplayViews(Dataset):
    """``base[i]`` under the seed of view ``v``; items ``(image, label, sample, view)``.

    ``views == 1`` without augmentation: the transform is deterministic, no seeding needed.
    """

    def __init__(self, base, views: int, seed: int):
        self.base, self.views, self.seed = base, views, seed

    def __len__(self) -> int:
        return len(self.base)

    def row_groups(self):
        return item_groups(self.base)

    def split(self, flat: int) -> tuple[int, int]:
        n = len(self.base)
        return flat % n, flat // n

    def image(self, index: int, view: int):
        if self.views == 1:
            return self.base[index]
        rng = torch.default_generator  # what the torchvision transforms draw from
        state = rng.get_state()  # leaves the caller's RNG stream untouched
        rng.manual_seed(view_seed(self.seed, view, index))
        try:
            return self.base[index]
        finally:
            rng.set_state(state)

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


class Indexed(Dataset):
    """``base``'s items followed by ``{"index": position}``: the image's position in the training
    set (the sample, not the flat view id, for replayed views), for a method that needs it (a
    memory bank with one row per image). The loader collates the dicts into a LongTensor."""

    def __init__(self, base):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def row_groups(self):
        return item_groups(self.base)

    def __getitem__(self, k):
        position = self.base.split(int(k))[0] if isinstance(self.base, ReplayViews) else int(k)
        return (*self.base[k], {"index": position})


class ViewSampler(ShuffleSampler):
    """Flat ids: the view of sample i changes every epoch (``data.sampling.ShuffleSampler``)."""

    def __init__(self, dataset, views: int, view_seed: int, **kwargs):
        super().__init__(dataset, views, view_seed, **kwargs)
