"""Building and choosing a teacher cache: the teacher over every replayed view, in shards.

The shards run wherever ``run_shards`` sends them (here in this process; as Ray tasks from the
cluster layer). Nothing here imports Ray.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from kd_ray.cache.rows import ShardWriter
from kd_ray.cache.store import (MANIFEST, check, mismatch, num_views, read_manifest, serves, verify_here,
                                wanted)
from kd_ray.config import Config, teacher_files
from kd_ray.data import build_data, describe
from kd_ray.data.views import ReplayViews
from kd_ray.engine import autocast_for, to_device
from kd_ray.errors import ConfigError
from kd_ray.log import get
from kd_ray.methods import method_class
from kd_ray.models import load_teachers
from kd_ray.storage import is_uri, location, rmtree, upload

log = get(__name__)
ShardRunner = Callable[[Config, list], list]
Builder = Callable[[Config, Path, dict], dict]


def resolve(cfg: Config, default_dir, build_cache: Builder | None = None) -> Config:
    """The config workers run with: ``distill.teacher_cache`` a checked folder, or ``off``.

    ``auto`` keeps the cache in ``default_dir`` and (re)builds it when absent or stale; an
    explicit folder is built when absent and refused when stale. ``build_cache(cfg, path, want)``
    builds (default: ``build`` in this process; the cluster layer passes its Ray build).
    """
    setting = cfg.distill.teacher_cache
    method = method_class(cfg.distill.loss)
    if setting == "off" or method.teacher is None:
        return cfg.replace(distill={"teacher_cache": "off"})
    if not serves(method):
        log.info(f"distill.loss={cfg.distill.loss} reads teacher features: the teacher runs live "
                 "every step and the teacher cache is not used")
        return cfg.replace(distill={"teacher_cache": "off"})
    if not teacher_files(cfg.distill):  # the CLI's checks say so first; a library caller hears it here
        raise ConfigError(f"a teacher cache needs a teacher: set distill.teacher_path (distill.loss="
                          f"{cfg.distill.loss} reads teacher logits)")
    path = location(default_dir if setting == "auto" else setting)
    path = path if is_uri(path) else path.expanduser().resolve()
    want = wanted(cfg)
    manifest = read_manifest(path)
    if manifest is not None or (path.exists() and setting != "auto"):
        reason = mismatch(manifest, want)
        if reason is None:
            verify_here(path, manifest)  # a row file cut short or changed: one line, no retries
            log.info(f"teacher cache {path}: {manifest['rows']} logit rows, up to date")
            return cfg.replace(distill={"teacher_cache": str(path)})
        if setting != "auto":
            check(path, want)
        log.info(f"teacher cache {path}: {reason}; rebuilding")
    (build_cache or build)(cfg, path, want)
    return cfg.replace(distill={"teacher_cache": str(path)})


def run_here(cfg: Config, jobs: list) -> list[dict]:
    """Shards one after the other in this process (tests, and callers without Ray)."""
    return [build_shard(*job) for job in jobs]


def build(cfg: Config, path, want: dict | None = None, run_shards: ShardRunner = run_here,
          workers: int | None = None, min_shard_rows: int = 1) -> dict:
    """Run the teacher over every (sample, view) in shards, then write the manifest last.

    ``run_shards(cfg, jobs)`` runs ``build_shard(*job)`` for each job (the cluster layer passes
    one that runs them as Ray tasks); ``workers``: shards to cut (default run.num_workers), but
    none with fewer than ``min_shard_rows`` rows (a shard's process start must pay for itself).
    """
    if is_uri(path):  # an object store has no rename: build here, copy with the manifest last
        with tempfile.TemporaryDirectory() as local:
            manifest = build(cfg, Path(local) / "cache", want, run_shards, workers, min_shard_rows)
            rmtree(path)
            upload(Path(local) / "cache", path, skip=(MANIFEST,))
        log.info(f"teacher cache copied to {path}")
        return manifest
    path = Path(path)
    want = want or wanted(cfg)
    samples, views = describe(cfg.data).train_count, want["transform"]["views"]
    total = samples * views
    shards = max(1, min(workers or cfg.run.max_workers, total, -(-total // min_shard_rows)))
    bounds = np.linspace(0, total, shards + 1).astype(int)
    staging = path.with_name(path.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    log.info(f"teacher cache: {samples} images x {views} view(s) through the teacher on "
             f"{shards} worker(s) -> {path}")
    started = time.perf_counter()
    jobs = [(cfg.to_dict(), k, int(bounds[k]), int(bounds[k + 1]), str(staging), want["top_k"],
             want["encoding"]) for k in range(shards)]
    stats = run_shards(cfg, jobs)
    seconds = time.perf_counter() - started
    rows = sum(s["rows"] for s in stats)
    manifest = dict(want, rows=rows, samples=samples, views=views, num_classes=stats[0]["classes"],
                    teacher_forwards=sum(s["forwards"] for s in stats), shards=shards,
                    bounds=[int(b) for b in bounds],
                    teacher_path=cfg.distill.teacher_path, build_seconds=round(seconds, 2),
                    files={name: sums for s in stats for name, sums in s.get("files", {}).items()},
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)  # the finished cache appears at once, manifest included
    size = sum(f.stat().st_size for f in path.glob("part-*"))
    encoding = {"topk": f"top-{want['top_k']} logits + rest", "int8": "int8 logits (per-row scale)"}.get(
        want["encoding"], "dense float16 logits")
    log.info(f"teacher cache: {rows} rows in {seconds:.1f}s ({rows / max(seconds, 1e-9):.0f} "
             f"images/s), {encoding}, {size / 2**20:.1f} MiB on disk")
    return manifest


def build_shard(cfg_dict: dict, shard: int, start: int, stop: int, folder: str,
                top_k: int | None = None, encoding: str | None = None) -> dict:
    """Teacher logits of flat ids [start, stop) (flat id = view * N + sample), written batch by
    batch to this shard's row files (``encoding``, ``top_k``: what ``wanted`` chose)."""
    cfg = Config.from_dict(cfg_dict)
    torch.set_num_threads(cfg.run.threads_per_worker)
    device = torch.device("cuda" if cfg.run.use_gpu and torch.cuda.is_available() else "cpu")
    nhwc = cfg.run.channels_last and device.type == "cuda"
    bundle = build_data(cfg.data, "distill", cfg.run.seed)
    teacher = load_teachers(teacher_files(cfg.distill), cfg.distill.teacher_weights, bundle.image_size,
                            bundle.norm, device=device)
    if nhwc:
        teacher = teacher.to(memory_format=torch.channels_last)
    forwards = [0]
    teacher.register_forward_pre_hook(lambda _m, args: forwards.__setitem__(0, forwards[0] + len(args[0])))
    replay = ReplayViews(bundle.train, num_views(cfg),
                         cfg.data.split_seed)
    loader = DataLoader(Subset(replay, range(start, stop)), batch_size=cfg.distill.cache_batch_size,
                        num_workers=cfg.data.loader_workers)
    writer, expected = None, start
    with torch.inference_mode():
        for images, _labels, index, view in loader:
            with autocast_for(device, cfg.run.bf16):
                logits = teacher(to_device(images, device, nhwc)).float().cpu().numpy()
            flat = view.numpy().astype(np.int64) * len(replay) + index.numpy()
            if not np.array_equal(flat, np.arange(expected, expected + len(flat))):
                raise RuntimeError("teacher cache rows came out of order")  # rows are placed by position
            expected += len(flat)
            if writer is None:
                writer = ShardWriter(folder, shard, stop - start, logits.shape[1], top_k, encoding)
            writer.add(logits)
    writer.close()
    return {"rows": stop - start, "forwards": forwards[0], "classes": writer.num_classes,
            "files": writer.sums}
