"""A 1-worker stage trained in one Ray task instead of a TorchTrainer (``run.runner: auto``).

A TorchTrainer costs ~17 CPU s before its first batch on 2 cores: a controller actor, a
placement-group cleaner, a sync actor and the worker actor, each a process with its own imports.
One worker has no DDP to set up, so the stage's task runs the same loop (worker.train_loop) in one
process, which Ray reuses for the job's next task (its imports already paid). The run folder is a
Train run's (checkpoints, metrics.jsonl, TensorBoard, failures.jsonl), and a failed attempt is
retried from the last checkpoint up to run.max_failures times, as Train's FailureConfig would.
"""
from __future__ import annotations

import itertools

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kd_ray.cluster.callbacks import MetricsCallback
from kd_ray.cluster.worker import train_loop
from kd_ray.config import Config
from kd_ray.engine import checkpoints
from kd_ray.errors import RunFailedError, describe, one_line, user_error_of_workers
from kd_ray.log import get
from kd_ray.runs.files import append_failure, prune_checkpoints
from kd_ray.runs.stages import failure_message

log = get(__name__)


def in_one_task(cfg: Config) -> bool:
    return cfg.run.runner == "auto" and cfg.run.num_workers == 1  # [min, max] is elastic: Train


class SingleSession:
    """worker.train_loop's side in one process: rank 0 of 1, no DDP, our own checkpoint folders
    (pruned to run.keep_checkpoints as Train would) and metrics rows (MetricsCallback's)."""

    rank, world = 0, 1

    def __init__(self, cfg: Config, run_dir, tensorboard: bool = True, tracker=None):
        self.device = torch.device("cuda" if cfg.run.use_gpu else "cpu")  # Ray set CUDA_VISIBLE_DEVICES
        self.keep = cfg.run.keep_checkpoints
        self.metrics = MetricsCallback(str(run_dir), tensorboard=tensorboard, tracker=tracker)
        self.last = None  # the last report's metrics (the stage's summary reads them)

    def prepare(self, model):
        return model.to(self.device)

    def report(self, metrics: dict, state: dict | None, run_dir, history: list) -> None:
        checkpoints.save(run_dir, state, history)  # atomic, local folder or object storage alike
        prune_checkpoints(run_dir, self.keep)
        self.metrics.write_rows(metrics, history)
        self.last = metrics


def train_task(loop_config: dict, tracker) -> tuple[dict | None, dict | None]:
    """The task: (the KdRayError payload that stopped it or None, the last report's metrics)."""
    session = SingleSession(Config.from_dict(loop_config["config"]), loop_config["run_dir"],
                            tracker=tracker)
    try:
        return train_loop(loop_config, session), session.last
    finally:
        session.metrics.close()  # the process may run the job's next task


def fit_in_task(cfg: Config, loop_config: dict, label: str, run_dir, tracker,
                failures_before: int) -> tuple[dict | None, dict | None]:
    """Run ``train_task`` until it returns, retrying a failed attempt from its checkpoint.

    A KdRayError raised inside (a bad layer name found late) is not retried: it is raised here as
    one line. A second Ctrl-C (KeyboardInterrupt here) cancels the task at once.
    """
    here = ray.get_runtime_context().get_node_id()  # the head for cluster jobs: files land there
    task = ray.remote(train_task).options(
        num_cpus=0 if cfg.run.use_gpu else cfg.run.cpus_per_worker, num_gpus=1 if cfg.run.use_gpu else 0,
        max_retries=0, name=label if label.isascii() and label.isprintable() else "kd-ray stage",
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True))
    for attempt in itertools.count(1):
        ref = task.remote(loop_config, tracker)
        try:
            return ray.get(ref)
        except KeyboardInterrupt:
            ray.cancel(ref, force=True)
            raise
        except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError) as exc:
            found = user_error_of_workers({0: exc})
            if found is not None:
                raise found from exc
            append_failure(run_dir, {"0": describe(exc)})
            if 0 <= cfg.run.max_failures < attempt:
                raise RunFailedError(failure_message(cfg, run_dir, failures_before, exc)) from exc
            log.warning(f"{label}: attempt {attempt} failed ({one_line(exc)}); restarting from the "
                        "last checkpoint")
