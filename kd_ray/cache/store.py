"""Teacher logits computed once, stored as Parquet, read by every epoch and every sweep trial.

A cache is a folder: ``part-NNNNN.parquet`` shards (columns ``sample``, ``view`` and either
``logits``, float16 [C], or ``top_index``/``top_logit`` [k] plus ``rest``, the log of the mass the
other classes hold) and ``manifest.json``, written last, which records what the logits were
computed from. Logits (not probabilities) are stored so that any temperature works.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kd_ray.config import Config, teacher_files
from kd_ray.data import load_source
from kd_ray.errors import ConfigError
from kd_ray.storage import is_uri, location, open_bytes

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FIX = "rebuild it with `kd-ray cache-teacher`, or set distill.teacher_cache=auto"


def num_views(cfg: Config) -> int:
    """K views per image with augmentation; without it every epoch sees the same image."""
    return cfg.distill.cache_views if cfg.data.augment else 1


def serves(method_cls) -> bool:
    """Logits-only methods read the cache; feature methods need the live teacher."""
    return method_cls.teacher == "logits"


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") if not is_uri(path) else open_bytes(path) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_fingerprint(cfg: Config):
    """sha256 of the teacher file; for an ensemble, of every file with its weight (a changed
    file, weight or order makes the cache stale)."""
    paths = teacher_files(cfg.distill)
    if len(paths) == 1 and cfg.distill.teacher_weights is None:
        return sha256_file(paths[0])
    weights = cfg.distill.teacher_weights or [1.0] * len(paths)
    return [[sha256_file(p), float(w)] for p, w in zip(paths, weights)]


def data_fingerprint(cfg: Config) -> str:
    """Hash of what decides the distillation images: dataset settings, classes, sample list."""
    d = cfg.data
    src = load_source(d)
    parts = [d.name, d.root, d.train_split, d.split_seed, d.val_fraction, d.synthetic_size,
             src.classes, src.train_labels]
    raw_train, _ = src.open(d.image_size or src.image_size)
    if hasattr(raw_train, "samples"):  # ImageFolder: the files, in order
        parts.append([str(Path(p).relative_to(d.root)) for p, _ in raw_train.samples])
    if d.name == "parquet":
        stat = (Path(d.root) / f"{d.train_split}.parquet").stat()
        parts.append([stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def wanted(cfg: Config) -> dict:
    """The manifest fields a cache must match to be used with ``cfg``."""
    return {
        "format": FORMAT_VERSION,
        "teacher_sha256": teacher_fingerprint(cfg),
        "data": data_fingerprint(cfg),
        "transform": {"image_size": cfg.data.image_size, "augment": cfg.data.augment,
                      "views": num_views(cfg), "view_seed": cfg.data.split_seed},
        "top_k": cfg.distill.cache_top_k,
    }


def read_manifest(path) -> dict | None:
    try:
        return json.loads((location(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def mismatch(manifest: dict | None, want: dict) -> str | None:
    """Why a cache does not fit (one phrase), or None when it does."""
    if manifest is None:
        return "it has no readable manifest.json (an unfinished build?)"
    names = {"format": "cache format", "teacher_sha256": "teacher file (or ensemble)", "data": "dataset",
             "transform": "transform/augmentation settings", "top_k": "distill.cache_top_k"}
    for key, what in names.items():
        if manifest.get(key) != want[key]:
            return f"it was built for another {what}"
    return None


def check(path, want: dict) -> None:
    """Refuse a cache that does not match, in one line."""
    reason = mismatch(read_manifest(path), want)
    if reason:
        raise ConfigError(f"teacher cache {path} does not match this run: {reason}; {FIX}")


def fixed_list(values: np.ndarray, dtype) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.astype(dtype).ravel()), values.shape[1])


def encode(logits: np.ndarray, top_k: int | None) -> dict:
    if not top_k or top_k >= logits.shape[1]:
        return {"logits": fixed_list(logits, np.float16)}
    index = np.argsort(-logits, axis=1)[:, :top_k]
    top = np.take_along_axis(logits, index, axis=1)
    others = logits.copy()
    np.put_along_axis(others, index, -np.inf, axis=1)
    peak = others.max(axis=1, keepdims=True)
    rest = peak[:, 0] + np.log(np.exp(others - peak).sum(axis=1))  # logsumexp of the other classes
    return {"top_index": fixed_list(index, np.int32), "top_logit": fixed_list(top, np.float16),
            "rest": rest.astype(np.float32)}


@dataclass
class CachedLogits:
    """The cache in memory: dense float16 [views, samples, C], or top-k rows rebuilt per item."""
    samples: int
    views: int
    num_classes: int
    dense: np.ndarray | None = None
    top_index: np.ndarray | None = None
    top_logit: np.ndarray | None = None
    rest: np.ndarray | None = None

    def row(self, index: int, view: int):
        if self.dense is not None:
            return torch.from_numpy(self.dense[view, index])  # float16; the loss upcasts it
        k = self.top_index.shape[-1]
        # The other classes share the stored mass equally: exact top-k probabilities at T = 1.
        full = np.full(self.num_classes, self.rest[view, index] - math.log(self.num_classes - k),
                       dtype=np.float32)
        full[self.top_index[view, index]] = self.top_logit[view, index]
        return torch.from_numpy(full)


def load(path) -> CachedLogits:
    """Read a finished cache; every (sample, view) must be present exactly once."""
    path = location(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise ConfigError(f"teacher cache {path} has no manifest.json; {FIX}")
    n, k, c = manifest["samples"], manifest["views"], manifest["num_classes"]
    parts = sorted(path.glob("part-*.parquet"), key=lambda p: p.name)
    if is_uri(path):  # read through the store's filesystem (s3://, gs://, ...)
        table = pq.read_table([p.fs_path for p in parts], filesystem=path.fs)
    else:
        table = pq.read_table([str(p) for p in parts])
    slot = table.column("view").to_numpy() * n + table.column("sample").to_numpy()
    if len(slot) != n * k or len(np.unique(slot)) != n * k:
        raise ConfigError(f"teacher cache {path} is incomplete ({len(slot)} of {n * k} rows); {FIX}")
    out = CachedLogits(n, k, c)

    def dense(name, width, dtype):
        values = table.column(name).combine_chunks().values.to_numpy(zero_copy_only=False)
        grid = np.empty((k * n, width), dtype=dtype)
        grid[slot] = values.reshape(-1, width)
        return grid.reshape(k, n, width)

    if "logits" in table.column_names:
        out.dense = dense("logits", c, np.float16)
    else:
        top = manifest["top_k"]
        out.top_index = dense("top_index", top, np.int32)
        out.top_logit = dense("top_logit", top, np.float16)
        rest = np.empty(k * n, dtype=np.float32)
        rest[slot] = table.column("rest").to_numpy()
        out.rest = rest.reshape(k, n)
    return out
