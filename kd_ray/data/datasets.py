"""Datasets of a stage: transforms, the labelled subset / transfer set, and the driver's checks.

Each dataset registry entry (sources.py) returns a ``Source``; the code here adds transforms
and the teacher/student/distill label policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kd_ray.config import STAGES, DataConfig
from kd_ray.data.sampling import item_groups
from kd_ray.data.sources import DATASETS, Source
from kd_ray.errors import ConfigError, DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # tensor sources: (x - 0.5) / 0.5


def normalization(src: Source) -> tuple:
    """(mean, std) per channel of the images the model sees (recorded in teacher.pt)."""
    return (IMAGENET_MEAN, IMAGENET_STD) if src.pil else HALF_NORM


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    classes: list[str]
    image_size: int
    norm: tuple = HALF_NORM
    """(mean, std) the images were normalised with."""
    test: Optional[Dataset] = None
    """The test split (read once, after the last epoch), or None."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class DataInfo:
    classes: list[str]
    image_size: int
    train_count: int
    val_count: int
    norm: tuple = HALF_NORM
    test_count: int = 0


class View(Dataset):
    """Items ``indices`` of a raw dataset, transformed, with the given labels (-1 = unlabelled)."""

    def __init__(self, raw, transform, indices, labels):
        self.raw, self.transform = raw, transform
        self.indices = np.asarray(indices)  # int32 or int64: 4-8 bytes per item, no copy
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.indices)

    def row_groups(self):
        """Row group of each item when the raw dataset is read by row group (Parquet), else None."""
        groups = item_groups(self.raw)
        return None if groups is None else groups[self.indices]

    def __getitem__(self, k):
        image, _ = self.raw[int(self.indices[k])]
        return self.transform(image), int(self.labels[k])


class TensorTransform:
    """float [C,h,w] in [0,1] -> normalized float [3,size,size]; optional random shift."""

    def __init__(self, size: int, augment: bool):
        self.size, self.augment = size, augment

    def __call__(self, x):
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)[0]
        if self.augment:  # shift only: flips would change digits' meaning
            pad = self.size // 8
            x = F.pad(x, (pad, pad, pad, pad))
            i, j = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = x[:, i:i + self.size, j:j + self.size]
        x = (x - 0.5) / 0.5
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def make_transform(src: Source, size: int, train: bool, augment: bool):
    if not src.pil:
        return TensorTransform(size, train and augment)
    # torchvision here, not at the top: its import costs ~2 CPU s (torch._dynamo), which runs on
    # tensor data (synthetic, digits, the MNIST subset) skip in every worker process.
    from torchvision import transforms as T
    from torchvision.transforms import v2

    # uint8 tensors (data.decoder=torchvision): the same steps in transforms.v2, resized as uint8
    # (antialiased, as PIL does) and converted to float last, when the image is small.
    lib = v2 if src.uint8 else T
    to_float = v2.ToDtype(torch.float32, scale=True) if src.uint8 else T.ToTensor()
    tail = [to_float, lib.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train and augment:
        crop = lib.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True)
        return lib.Compose([crop, lib.RandomHorizontalFlip(), *tail])
    return lib.Compose([lib.Resize(size, antialias=True), lib.CenterCrop(size), *tail])


def labeled_indices(labels, n: int, seed: int, classes=None) -> np.ndarray:
    """Sorted indices of ``n`` examples per class, the same for the same ``seed``."""
    labels = np.asarray(labels, dtype=np.int64)
    num = len(classes) if classes is not None else int(labels.max()) + 1
    _check_label_counts(labels, n, classes or [str(c) for c in range(num)])
    order = np.argsort(labels, kind="stable")
    bounds = np.cumsum(np.bincount(labels, minlength=num))[:-1]
    rng = np.random.default_rng(seed)
    picked = [rng.choice(group, n, replace=False) for group in np.split(order, bounds)]
    return np.sort(np.concatenate(picked))


def _check_label_counts(labels, n: int, classes: list[str]) -> None:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    low = int(np.argmin(counts))
    if counts[low] < n:
        raise DataError(
            f"data.labels_per_class={n} but class {classes[low]!r} has only {counts[low]} training "
            f"images: set data.labels_per_class to at most {counts[low]}"
        )


def load_source(cfg: DataConfig) -> Source:
    src = DATASETS.get(cfg.name)(cfg)
    found = len(src.classes)
    if cfg.num_classes is not None and cfg.num_classes != found:
        names = ", ".join(src.classes[:20]) + (", ..." if found > 20 else "")
        raise DataError(
            f"dataset has {found} classes ({names}) but data.num_classes={cfg.num_classes}: "
            f"set data.num_classes={found} or remove it"
        )
    return src


def test_holdout(src: Source, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(training indices kept, test indices): ``data.test_fraction`` of the training images,
    stratified and seeded by ``data.split_seed``, when the source has no test split of its own."""
    n = len(src.train_labels)
    every = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    if src.open_test is not None or not cfg.test_fraction:
        return every, every[:0]
    from sklearn.model_selection import train_test_split  # local: sklearn is slow to import

    try:
        keep, test = train_test_split(every, test_size=cfg.test_fraction, random_state=cfg.split_seed,
                                      stratify=np.asarray(src.train_labels))
    except ValueError as exc:  # a class with a single image cannot be split
        raise DataError(f"data.test_fraction={cfg.test_fraction} cannot hold out a stratified test "
                        f"split: {exc}; lower data.test_fraction or add a test split folder") from None
    return np.sort(keep), np.sort(test)


def describe(cfg: DataConfig) -> DataInfo:
    """Driver-side check before workers start: reads folder listings and labels, no image decoding."""
    src = load_source(cfg)
    _check_two_classes(cfg, src.classes)
    keep, test = test_holdout(src, cfg)
    if cfg.labels_per_class is not None:
        _check_label_counts(np.asarray(src.train_labels)[keep], cfg.labels_per_class, src.classes)
    tests = len(src.test_labels) if src.test_labels is not None else len(test)
    return DataInfo(src.classes, cfg.image_size or src.image_size, len(keep),
                    len(src.val_labels), normalization(src), tests)


def _check_two_classes(cfg: DataConfig, classes: list) -> None:
    """One class trains to 100% and means nothing: refused on the driver."""
    if len(classes) >= 2:
        return
    found = f"only class {classes[0]!r}" if classes else "no class"
    if cfg.name == "synthetic":
        fix = "set data.num_classes to 2 or more"
    else:
        where = f" in {cfg.root}/{cfg.train_split}" if cfg.root else ""
        fix = f"add a folder (or label) per class{where}, at least 2"
    raise DataError(f"dataset {cfg.name} has {found}: a classifier needs at least 2 classes; {fix}")


def build_data(cfg: DataConfig, stage: str, seed: int) -> DataBundle:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    src = load_source(cfg)
    size = cfg.image_size or src.image_size
    raw_train, raw_val = src.open(size)
    all_labels = np.asarray(src.train_labels, dtype=np.int64)
    indices, held_out = test_holdout(src, cfg)  # the test images never reach training
    labels = all_labels[indices]
    if stage != "teacher" and cfg.labels_per_class is not None:
        keep = indices[labeled_indices(labels, cfg.labels_per_class, seed, src.classes)]
        if stage == "student":
            # Repeat the small labelled set up to the full size: as many steps per epoch as distill.
            indices = np.resize(np.random.default_rng(seed).permutation(keep), len(indices))
            labels = all_labels[indices]
        else:
            labels = np.where(np.isin(indices, keep), labels, -1)
    evaluation = make_transform(src, size, False, False)
    train = View(raw_train, make_transform(src, size, True, cfg.augment), indices, labels)
    val = View(raw_val, evaluation, np.arange(len(raw_val)), src.val_labels)
    test = None
    if src.open_test is not None:
        raw_test = src.open_test(size)
        test = View(raw_test, evaluation, np.arange(len(raw_test)), src.test_labels)
    elif len(held_out):
        test = View(raw_train, evaluation, held_out, all_labels[held_out])
    return DataBundle(train, val, src.classes, size, normalization(src), test)
