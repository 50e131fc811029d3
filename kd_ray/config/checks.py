"""Checks of the files a run reads that need no torch or Ray: the CLI runs them first, so a wrong
path is refused in a fraction of a second (the deeper checks, which open the data and the
teacher file, follow in ``runs.stages.preflight``)."""
from __future__ import annotations

import os
from pathlib import Path

from kd_ray.errors import ConfigError, DataError
from kd_ray.storage import check_storage

PRETRAINED_FIX = "give a local .pt/.pth file (weights are never downloaded)"


def is_uri(path: str) -> bool:
    return "://" in str(path)


def check_paths(cfg, stages=("teacher", "student", "distill")) -> None:
    """Refuse a ``data.root`` or pretrained-weights file that does not exist, and a storage
    folder that cannot be made (a regular file on its path)."""
    root = cfg.data.root
    if root is not None and not is_uri(root) and not Path(root).expanduser().is_dir():
        raise DataError(f"data.root {root} not found: set data.root to the folder that holds the "
                        f"dataset's splits ({cfg.data.train_split}, {cfg.data.val_split})")
    for stage in stages:
        weights = cfg.model.teacher_pretrained if stage == "teacher" else cfg.model.student_pretrained
        if weights and not is_uri(weights) and not Path(weights).expanduser().is_file():
            raise ConfigError(f"pretrained weights {weights} not found; {PRETRAINED_FIX}")
    if is_uri(cfg.run.storage):
        check_storage(cfg.run.storage)  # a missing bucket or an unknown scheme: one line, now
        return
    storage = Path(cfg.run.storage).expanduser()
    for folder in (storage, *storage.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"run.storage {cfg.run.storage}: {folder} is a file, not a folder: "
                                  "set run.storage to a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ConfigError(f"run.storage {cfg.run.storage}: {folder} is not writable: set "
                                  "run.storage to a folder you can write")
            break


def machine_counts(gpus: bool = True) -> tuple[int, int]:
    """(CPUs, GPUs) of this machine, as a local Ray instance would get them (GPUs: 0 unless asked)."""
    if not gpus:
        return os.cpu_count() or 1, 0
    import torch  # local: only for the GPU count

    return os.cpu_count() or 1, torch.cuda.device_count()


def check_machine(cfg) -> None:
    """On a local instance (no RAY_ADDRESS), refuse more workers than this machine holds, and
    batches its memory cannot hold.

    A cluster's own resources are checked after joining it (cluster.session.check_resources).
    """
    if os.environ.get("RAY_ADDRESS"):
        return
    check_batch_memory(cfg)
    run = cfg.run
    cpus, gpus = machine_counts(gpus=run.use_gpu)
    if run.use_gpu and run.min_workers > gpus:  # an elastic run starts with what it finds
        raise ConfigError(f"run.num_workers={run.num_workers} with run.use_gpu needs {run.min_workers} "
                          f"GPUs but this machine has {gpus} GPU(s) and {cpus} CPUs: lower "
                          "run.num_workers, or join a cluster (RAY_ADDRESS or `kd-ray submit`)")
    needed = run.min_workers * run.cpus_per_worker
    if not run.use_gpu and needed > cpus:
        raise ConfigError(f"run.num_workers={run.num_workers} x run.cpus_per_worker={run.cpus_per_worker:g} "
                          f"needs {needed:g} CPUs but this machine has {cpus}: "
                          "lower run.num_workers, or join a cluster (RAY_ADDRESS or `kd-ray submit`)")


def machine_memory() -> int | None:
    """Bytes of physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_batch_memory(cfg) -> None:
    """Refuse a data.image_size whose input batches alone (float32, 3 channels, one per local
    worker) exceed this machine's memory: a worker would run out of memory after Ray started."""
    size, memory = cfg.data.image_size, machine_memory()
    if size is None or not memory:
        return
    batch = cfg.optim.batch_size * 3 * size * size * 4
    needed = batch * cfg.run.max_workers
    if needed > memory:
        raise ConfigError(f"data.image_size={size}: one batch of optim.batch_size={cfg.optim.batch_size} "
                          f"images of {size}x{size} takes {batch / 2**30:,.1f} GiB per worker "
                          f"(x run.num_workers={cfg.run.num_workers}) but this machine has "
                          f"{memory / 2**30:,.1f} GiB of memory: lower data.image_size (or optim.batch_size)")
