"""Teacher logits computed once, stored in fixed-width row files, read by every epoch and trial.

A cache is a folder: shard files (``rows.py``: float16 logits [C] per row by default; int8 or the
top-k logits and the log of the other classes' mass when asked) and ``manifest.json``, written
last, which records what the logits were computed from, which flat ids each shard holds and each
row file's bytes and CRC-32 (``verify``: a file cut short or changed is refused, not read as rows
of another size). Logits (not probabilities) are stored so that any temperature works. Workers
read a row at a time: O(batch) rows in memory.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from kd_ray.cache.rows import CachedLogits, file_crc32
from kd_ray.config import Config, teacher_files
from kd_ray.data import load_source
from kd_ray.errors import CacheError, ConfigError
from kd_ray.storage import is_uri, local_copy, location, open_bytes

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: row files read a row at a time, splitmix view seeds
DEFAULT_TOP_K = 32  # distill.cache_encoding: topk without distill.cache_top_k
LEGACY_ENCODING = {"dense": "float16", "top_k": "topk"}  # manifests before cache_encoding
FIX = "rebuild it with `kd-ray cache-teacher`, or set distill.teacher_cache=auto"
CHECKSUM_BYTES = 2**30  # the driver checks the CRC-32s of caches up to this size (about 1 s)


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


def _data_facts(cfg: Config) -> tuple[str, int, int]:
    """(hash of what decides the distillation images, samples, classes)."""
    d = cfg.data
    src = load_source(d)
    labels = np.asarray(src.train_labels, dtype=np.int64)
    parts = [d.name, d.root, d.train_split, d.split_seed, d.val_fraction, d.synthetic_size,
             src.classes, hashlib.sha256(labels.tobytes()).hexdigest()]
    if d.test_fraction and src.open_test is None:  # held-out test images leave the transfer set
        parts.append(["test_fraction", d.test_fraction])
    raw_train, _ = src.open(d.image_size or src.image_size)
    if hasattr(raw_train, "samples"):  # ImageFolder: the files, in order
        parts.append([str(Path(p).relative_to(d.root)) for p, _ in raw_train.samples])
    if hasattr(raw_train, "files"):  # Parquet: the shard files, their sizes and times
        parts.append([[f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in raw_train.files])
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
    return digest, len(labels), len(src.classes)


def choose_encoding(classes: int, encoding: str | None, top_k: int | None) -> tuple[str, int | None]:
    """(encoding, k): dense float16 whatever the cache's size (rows stream from disk, so size
    costs disk, not memory) unless ``distill.cache_encoding`` (or a ``cache_top_k``) asks for a
    smaller one; top-k with k >= the classes is dense."""
    encoding = encoding or ("topk" if top_k else "float16")
    if encoding != "topk":
        return encoding, None
    k = top_k or DEFAULT_TOP_K
    return ("topk", k) if k < classes else ("float16", None)


def wanted(cfg: Config) -> dict:
    """The manifest fields a cache must match to be used with ``cfg``."""
    data, samples, classes = _data_facts(cfg)
    transform = {"image_size": cfg.data.image_size, "augment": cfg.data.augment,
                 "views": num_views(cfg), "view_seed": cfg.data.split_seed}
    if cfg.data.decoder != "pil":  # other pixels and random draws; pil caches keep their key
        transform["decoder"] = cfg.data.decoder
    encoding, top_k = choose_encoding(classes, cfg.distill.cache_encoding, cfg.distill.cache_top_k)
    return {
        "format": FORMAT_VERSION,
        "teacher_sha256": teacher_fingerprint(cfg),
        "data": data,
        "transform": transform,
        "top_k": top_k,
        "encoding": encoding,
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
             "transform": "transform/augmentation settings", "top_k": "distill.cache_top_k",
             "encoding": "distill.cache_encoding"}
    manifest = dict(manifest, encoding=LEGACY_ENCODING.get(manifest.get("encoding"), manifest.get("encoding")))
    for key, what in names.items():
        if manifest.get(key) != want[key]:
            return f"it was built for another {what}"
    return None


def check(path, want: dict) -> None:
    """Refuse a cache that does not match, in one line."""
    reason = mismatch(read_manifest(path), want)
    if reason:
        raise ConfigError(f"teacher cache {path} does not match this run: {reason}; {FIX}")


def load(path) -> CachedLogits:
    """Open a finished cache for reading; its shards must hold every (sample, view) once."""
    manifest = read_manifest(path)
    if manifest is None:
        raise ConfigError(f"teacher cache {path} has no manifest.json; {FIX}")
    # Rows are read one at a time with seeks: from object storage, a local copy serves them.
    path = local_copy(path) if is_uri(path) else Path(path)
    n, k, c = manifest["samples"], manifest["views"], manifest["num_classes"]
    bounds = manifest.get("bounds", [])
    try:
        logits = CachedLogits(path, n, k, c, bounds)
        ok = bounds[0] == 0 and bounds[-1] == n * k and logits.complete()
    except (OSError, ValueError, IndexError):
        ok = False
    if not ok:
        raise ConfigError(f"teacher cache {path} is incomplete (shard files missing or short for "
                          f"{n * k} rows); {FIX}")
    verify(path, manifest, logits)
    return logits


def verify(path, manifest: dict, logits: CachedLogits | None = None, checksums: bool = False) -> None:
    """Refuse, in one line naming the file, a row file whose size differs from what its header
    promises and the manifest recorded, or (``checksums``) whose CRC-32 differs from the one
    written with it. Caches of older builds record neither: their sizes are checked from the
    headers alone."""
    path = Path(path)
    logits = logits or CachedLogits(path, manifest["samples"], manifest["views"],
                                    manifest["num_classes"], manifest.get("bounds", []))
    recorded = manifest.get("files") or {}
    fix = f"delete the cache folder (rm -r {path}) and rerun, which builds it again"
    for file, promised in logits.files():
        size = file.stat().st_size
        written = recorded.get(file.name, {}).get("bytes", promised)
        if size != promised or size != written:
            raise CacheError(f"teacher cache row file {file} is {size} bytes but {written} were "
                             f"written (cut short or changed): {fix}")
    if checksums:
        for file, _ in logits.files():
            crc = recorded.get(file.name, {}).get("crc32")
            if crc is not None and file_crc32(file) != crc:
                raise CacheError(f"teacher cache row file {file} does not match the checksum written "
                                 f"with it (changed after the build): {fix}")


def verify_here(path, manifest: dict) -> None:
    """The driver's check of a local cache before it is used: sizes always, checksums of caches
    up to CHECKSUM_BYTES (a larger one would take seconds to read at every start)."""
    if is_uri(path):  # workers check the sizes of their local copy (``load``)
        return
    try:
        logits = CachedLogits(Path(path), manifest["samples"], manifest["views"],
                              manifest["num_classes"], manifest.get("bounds", []))
    except (OSError, ValueError, KeyError, IndexError):
        return  # missing files or fields: ``load`` names them as incomplete
    total = sum(size for _, size in logits.files())
    verify(path, manifest, logits, checksums=total <= CHECKSUM_BYTES)
