"""The teacher cache built on the cluster: one Ray task per shard, as many shards as workers fit
and the rows pay for."""
from __future__ import annotations

from pathlib import Path

import ray

from kd_ray.cache import build, build_shard, read_manifest, resolve
from kd_ray.cluster.session import ensure_ray
from kd_ray.config import Config
from kd_ray.log import get
from kd_ray.runs.stages import check_cache_teacher
from kd_ray.storage import location, storage_root

log = get(__name__)
# A shard is a Ray task whose process imports torch and loads the teacher (~5 CPU s): one per
# worker for a small build would spend more on starts than on the teacher. 2,048 rows are a few
# seconds of a small CNN on one core and minutes of a ResNet-50 at 224 px; ImageNet is 600 shards' worth.
MIN_SHARD_ROWS = 2048


def resolve_cache(cfg: Config, default_dir) -> Config:
    """``cache.resolve`` whose builds run as Ray tasks (Ray starts only if a build is needed)."""
    return resolve(cfg, default_dir, build_cache=build_on_ray)


def build_on_ray(cfg: Config, path: Path, want: dict) -> dict:
    ensure_ray(cfg)  # started only now: a stale or bad input was refused before
    return build(cfg, path, want, run_shards=run_on_ray, workers=free_workers(cfg),
                 min_shard_rows=MIN_SHARD_ROWS)


def cache_teacher(cfg: Config, out=None, checked: bool = False) -> tuple[Path, dict]:
    """``kd-ray cache-teacher``: check the inputs (unless ``checked``), then build or confirm."""
    if not checked:
        cfg = check_cache_teacher(cfg)
    setting = cfg.distill.teacher_cache
    default = location(storage_root(cfg.run.storage)) / "teacher_cache"
    path = location(storage_root(out or (setting if setting not in ("auto", "off") else default)))
    resolve_cache(cfg.replace(distill={"teacher_cache": "auto"}), path)
    return path, read_manifest(path)


def free_workers(cfg: Config) -> int:
    """Shards for the build: as many workers as the cluster holds (at least run.num_workers)."""
    have = ray.cluster_resources()
    fits = have.get("GPU", 0) if cfg.run.use_gpu else have.get("CPU", 0) // cfg.run.cpus_per_worker
    return max(cfg.run.min_workers, int(fits))


def run_on_ray(cfg: Config, jobs: list) -> list[dict]:
    task = ray.remote(build_shard).options(
        num_cpus=0 if cfg.run.use_gpu else cfg.run.cpus_per_worker,
        num_gpus=1 if cfg.run.use_gpu else 0, max_retries=1)
    pending = [task.remote(*job) for job in jobs]
    stats = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        stats.extend(ray.get(done))
        log.info(f"teacher cache: {len(stats)}/{len(jobs)} shards written")
    return stats
