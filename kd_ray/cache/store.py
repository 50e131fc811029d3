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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kd_ray.config import Config
from kd_ray.errors import ConfigError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FIX = "rebuild it with `kd-ray cache-teacher`, or set distill.teacher_cache=auto"


def num_views(cfg: Config) -> int:
    """K views per image with augmentation; without it every epoch sees the same image."""
    return cfg.distill.cache_views if cfg.data.augment else 1


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(cfg: Config) -> str:
    """Hash of what decides the distillation images: dataset settings, classes, sample list."""
    from kd_ray.data import _load

    d = cfg.data
    src = _load(d)
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
        "teacher_sha256": sha256_file(cfg.distill.teacher_path),
        "data": data_fingerprint(cfg),
        "transform": {"image_size": cfg.data.image_size, "augment": cfg.data.augment,
                      "views": num_views(cfg), "view_seed": cfg.data.split_seed},
        "top_k": cfg.distill.cache_top_k,
    }


def read_manifest(path) -> dict | None:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def mismatch(manifest: dict | None, want: dict) -> str | None:
    """Why a cache does not fit (one phrase), or None when it does."""
    if manifest is None:
        return "it has no readable manifest.json (an unfinished build?)"
    names = {"format": "cache format", "teacher_sha256": "teacher file", "data": "dataset",
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


def resolve(cfg: Config, default_dir, use_ray: bool = True) -> Config:
    """The config workers run with: ``distill.teacher_cache`` a checked folder, or ``off``.

    ``auto`` keeps the cache in ``default_dir`` and (re)builds it when absent or stale; an
    explicit folder is built when absent and refused when stale. Starts Ray only to build.
    """
    from kd_ray.losses import get_loss

    setting = cfg.distill.teacher_cache
    if setting == "off" or not get_loss(cfg.distill.loss)[1]:
        return cfg.replace(distill={"teacher_cache": "off"})
    path = Path(default_dir if setting == "auto" else setting).expanduser().resolve()
    want = wanted(cfg)
    manifest = read_manifest(path)
    if manifest is not None or (path.exists() and setting != "auto"):
        reason = mismatch(manifest, want)
        if reason is None:
            print(f"[kd_ray] teacher cache {path}: {manifest['rows']} logit rows, up to date", flush=True)
            return cfg.replace(distill={"teacher_cache": str(path)})
        if setting != "auto":
            check(path, want)
        print(f"[kd_ray] teacher cache {path}: {reason}; rebuilding", flush=True)
    build(cfg, path, want, use_ray=use_ray)
    return cfg.replace(distill={"teacher_cache": str(path)})


def cache_teacher(cfg: Config, out=None) -> tuple[Path, dict]:
    """``kd-ray cache-teacher``: check the inputs, then build (or confirm) the cache."""
    from kd_ray.launch import preflight
    from kd_ray.losses import get_loss

    if not get_loss(cfg.distill.loss)[1]:
        raise ConfigError(f"distill.loss={cfg.distill.loss} uses no teacher: nothing to cache")
    cfg = preflight(cfg, "distill")
    setting = cfg.distill.teacher_cache
    path = out or (setting if setting not in ("auto", "off") else Path(cfg.run.storage) / "teacher_cache")
    path = Path(path).expanduser().resolve()
    resolve(cfg.replace(distill={"teacher_cache": "auto"}), path)
    return path, read_manifest(path)


def build(cfg: Config, path, want: dict | None = None, use_ray: bool = True) -> dict:
    """Run the teacher over every (sample, view) in shards, then write the manifest last."""
    from kd_ray.data import describe

    path = Path(path)
    want = want or wanted(cfg)
    samples, views = describe(cfg.data).train_count, want["transform"]["views"]
    total = samples * views
    shards = max(1, min(_free_workers(cfg) if use_ray else cfg.run.num_workers, total))
    bounds = np.linspace(0, total, shards + 1).astype(int)
    staging = path.with_name(path.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    print(f"[kd_ray] teacher cache: {samples} images x {views} view(s) through the teacher on "
          f"{shards} worker(s) -> {path}", flush=True)
    started = time.perf_counter()
    jobs = [(cfg.to_dict(), k, int(bounds[k]), int(bounds[k + 1]), str(staging)) for k in range(shards)]
    if use_ray:
        stats = _run_on_ray(cfg, jobs)
    else:
        stats = [build_shard(*job) for job in jobs]
    seconds = time.perf_counter() - started
    rows = sum(s["rows"] for s in stats)
    manifest = dict(want, rows=rows, samples=samples, views=views, num_classes=stats[0]["classes"],
                    teacher_forwards=sum(s["forwards"] for s in stats), shards=shards,
                    teacher_path=str(cfg.distill.teacher_path), build_seconds=round(seconds, 2),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)  # the finished cache appears at once, manifest included
    print(f"[kd_ray] teacher cache: {rows} rows in {seconds:.1f}s "
          f"({rows / max(seconds, 1e-9):.0f} images/s)", flush=True)
    return manifest


def _free_workers(cfg: Config) -> int:
    """Shards for the build: as many workers as the cluster holds (at least run.num_workers)."""
    import ray

    from kd_ray.launch import ensure_ray

    ensure_ray(cfg)  # started only now: a stale or bad input was refused before
    have = ray.cluster_resources()
    fits = have.get("GPU", 0) if cfg.run.use_gpu else have.get("CPU", 0) // cfg.run.cpus_per_worker
    return max(cfg.run.num_workers, int(fits))


def _run_on_ray(cfg: Config, jobs: list) -> list[dict]:
    import ray

    task = ray.remote(build_shard).options(
        num_cpus=0 if cfg.run.use_gpu else cfg.run.cpus_per_worker,
        num_gpus=1 if cfg.run.use_gpu else 0, max_retries=1)
    pending = [task.remote(*job) for job in jobs]
    stats = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        stats.extend(ray.get(done))
        print(f"[kd_ray] teacher cache: {len(stats)}/{len(jobs)} shards written", flush=True)
    return stats


def build_shard(cfg_dict: dict, shard: int, start: int, stop: int, folder: str) -> dict:
    """Teacher logits of flat ids [start, stop) (flat id = view * N + sample) as one Parquet file."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from kd_ray.data import build_data
    from kd_ray.engine import autocast_for, to_device
    from kd_ray.models import load_teacher
    from kd_ray.views import ReplayViews

    cfg = Config.from_dict(cfg_dict)
    torch.set_num_threads(cfg.run.threads_per_worker)
    device = torch.device("cuda" if cfg.run.use_gpu and torch.cuda.is_available() else "cpu")
    nhwc = cfg.run.channels_last and device.type == "cuda"
    teacher, _ = load_teacher(cfg.distill.teacher_path, device=device)
    if nhwc:
        teacher = teacher.to(memory_format=torch.channels_last)
    forwards = [0]
    teacher.register_forward_pre_hook(lambda _m, args: forwards.__setitem__(0, forwards[0] + len(args[0])))
    replay = ReplayViews(build_data(cfg.data, "distill", cfg.run.seed).train, num_views(cfg),
                         cfg.data.split_seed)
    loader = DataLoader(Subset(replay, range(start, stop)), batch_size=cfg.distill.cache_batch_size,
                        num_workers=cfg.data.loader_workers)
    top_k = cfg.distill.cache_top_k
    columns: dict[str, list] = {"sample": [], "view": [], "logits": []}
    with torch.inference_mode():
        for images, _labels, index, view in loader:
            with autocast_for(device, cfg.run.bf16):
                logits = teacher(to_device(images, device, nhwc))
            columns["sample"].append(index.numpy())
            columns["view"].append(view.numpy().astype(np.int32))
            columns["logits"].append(logits.float().cpu().numpy())
    logits = np.concatenate(columns["logits"])
    table = {"sample": np.concatenate(columns["sample"]), "view": np.concatenate(columns["view"])}
    table.update(_encode(logits, top_k))
    pq.write_table(pa.table(table), Path(folder) / f"part-{shard:05d}.parquet")
    return {"rows": len(logits), "forwards": forwards[0], "classes": logits.shape[1]}


def _fixed(values: np.ndarray, dtype) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.astype(dtype).ravel()), values.shape[1])


def _encode(logits: np.ndarray, top_k: int | None) -> dict:
    if not top_k or top_k >= logits.shape[1]:
        return {"logits": _fixed(logits, np.float16)}
    index = np.argsort(-logits, axis=1)[:, :top_k]
    top = np.take_along_axis(logits, index, axis=1)
    others = logits.copy()
    np.put_along_axis(others, index, -np.inf, axis=1)
    peak = others.max(axis=1, keepdims=True)
    rest = peak[:, 0] + np.log(np.exp(others - peak).sum(axis=1))  # logsumexp of the other classes
    return {"top_index": _fixed(index, np.int32), "top_logit": _fixed(top, np.float16),
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
        import torch

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
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise ConfigError(f"teacher cache {path} has no manifest.json; {FIX}")
    n, k, c = manifest["samples"], manifest["views"], manifest["num_classes"]
    table = pq.read_table(sorted(str(p) for p in path.glob("part-*.parquet")))
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
