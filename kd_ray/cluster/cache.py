"""The teacher cache built on the cluster: one Ray task per shard, as many shards as workers fit."""
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


def resolve_cache(cfg: Config, default_dir) -> Config:
    """``cache.resolve`` whose builds run as Ray tasks (Ray starts only if a build is needed)."""
    return resolve(cfg, default_dir, build_cache=build_on_ray)


def build_on_ray(cfg: Config, path: Path, want: dict) -> dict:
    ensure_ray(cfg)  # started only now: a stale or bad input was refused before
    return build(cfg, path, want, run_shards=run_on_ray, workers=free_workers(cfg))


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
