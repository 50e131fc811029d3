"""Run one stage as a Ray Train ``TorchTrainer`` and file its results."""
from __future__ import annotations

import importlib
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from kd_ray.cluster.cache import resolve_cache
from kd_ray.cluster.callbacks import MetricsCallback
from kd_ray.cluster.session import check_resources, ensure_ray
from kd_ray.cluster.single import fit_in_task, in_one_task
from kd_ray.cluster.entry import train_loop_per_worker
from kd_ray.cluster.worker import FAULTS_ENV, FAULTS_MODULE
from kd_ray.config import Config
from kd_ray.engine import checkpoints
from kd_ray.errors import RunFailedError, RunInterrupted, from_payload, user_error_of_workers
from kd_ray.log import get
from kd_ray.runs.files import STOP_FILE, backfill, finished_summary, prune_checkpoints, read_failures
from kd_ray.runs.lock import RunLock
from kd_ray.runs.progress import ProgressPrinter
from kd_ray.runs.stages import check_resume, failure_message, fresh_name, preflight, stage_epochs
from kd_ray.runs.summary import summarize
from kd_ray.runs.tracking import stage_tracker
from kd_ray.storage import location, storage_root

try:  # a name inside Ray Train; where a Ray release moves it, runs keep Ray's default callbacks
    from ray.train.v2._internal.callbacks import DatasetsCallback
except ImportError:
    DatasetsCallback = None

log = get(__name__)


@dataclass
class StageResult:
    stage: str
    run_dir: Path
    summary: dict


def run_stage(cfg: Config, stage: str, storage: str | None = None, name: str | None = None,
              new: bool = False, checked: bool = False) -> StageResult:
    """Train one stage (teacher, student or distill) and return where its results are.

    An existing run of the same name resumes from its last usable checkpoint; ``new`` starts a
    fresh run beside it instead (``<name>-2``, ``<name>-3``, ...). ``checked``: ``cfg`` is what
    ``runs.stages.preflight`` returned (the CLI runs it before Ray is imported).
    """
    cfg = cfg if checked else preflight(cfg, stage)
    storage = storage_root(storage or cfg.run.storage)
    name = name or cfg.run.name
    if new:
        name = fresh_name(storage, name)
    run_dir = location(storage) / name
    with RunLock(run_dir):  # a no-op when the CLI holds it already
        return _run_locked(cfg, stage, storage, name, run_dir)


def _run_locked(cfg: Config, stage: str, storage: str, name: str, run_dir: Path) -> StageResult:
    epochs = stage_epochs(cfg, stage)
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a Ctrl-C of an earlier driver
    done = finished_summary(run_dir, epochs)
    if done is not None:
        log.info(f"{name} already finished {done['epochs']} epochs; nothing to train (delete {run_dir} "
                 "or pass --new to train it again)")
        return StageResult(stage, run_dir, done)
    resume = check_resume(cfg, stage, run_dir)
    if resume and resume["epoch"] >= epochs:  # stopped between its last checkpoint and summary
        backfill(run_dir, resume.get("history", []))
        log.info(f"{name} already finished {resume['epoch']} epochs (checkpoint {resume['folder']}); "
                 "nothing to train: summary written")
        return StageResult(stage, run_dir, summarize(cfg, stage, run_dir))
    if stage == "distill":  # teacher logits once for all epochs (distill.teacher_cache)
        cfg = resolve_cache(cfg, location(storage) / "teacher_cache")
    ensure_ray(cfg)  # forwards the storage credentials in the environment to the workers
    check_resources(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    label = f"{name} ({stage})"
    workers = "{}-{} (elastic)".format(*cfg.run.num_workers) if cfg.run.elastic else cfg.run.num_workers
    log.info(f"{label}: {epochs} epochs on {workers} worker(s), results in {run_dir}")
    if resume:
        done = "epoch 1" if resume["epoch"] == 1 else f"epochs 1-{resume['epoch']}"
        at = f" step {resume['step']}" if resume.get("step") else ""  # run.checkpoint_every_s
        log.info(f"resuming {name} from epoch {resume['epoch'] + 1}{at} ({done} done, "
                 f"{run_dir.name}/{resume['folder']}); --new starts a fresh run beside it")
        backfill(run_dir, resume.get("history", []))  # epochs whose metrics line was lost
        prune_checkpoints(run_dir, cfg.run.keep_checkpoints, protect=run_dir / resume["folder"])
    failures_before = len(read_failures(run_dir))
    tracker = stage_tracker(cfg, run_dir)  # built here: the tracking URI resolves on the driver
    before = signal.getsignal(signal.SIGINT)  # Ray's fit() replaces it and never puts it back
    try:
        with ProgressPrinter(run_dir, label):
            payload, metrics = fit(cfg, stage, storage, name, label, tracker, failures_before)
    except ray.train.TrainingFailedError as exc:
        raise_user_error(exc)
        raise RunFailedError(failure_message(cfg, run_dir, failures_before, exc)) from exc
    except KeyboardInterrupt:  # the second Ctrl-C: workers stopped at once
        found = checkpoints.latest(run_dir)
        if found:
            backfill(run_dir, found[1].get("history", []))
        raise
    finally:
        (run_dir / STOP_FILE).unlink(missing_ok=True)
        if before is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before)
    raise_returned_error(payload)
    prune_checkpoints(run_dir, cfg.run.keep_checkpoints)
    found = checkpoints.latest(run_dir)
    reached = found[1]["epoch"] if found else 0
    if reached < epochs:  # the first Ctrl-C or SIGTERM: every rank stopped after a checkpoint
        backfill(run_dir, found[1].get("history", []) if found else [])
        step = found[1].get("step") if found else None
        where = (f"in epoch {reached + 1} of {epochs} after step {step}" if step
                 else f"after epoch {reached} of {epochs}")
        raise RunInterrupted(f"stopped {where}, checkpointed in {run_dir}")
    summary = summarize(cfg, stage, run_dir, metrics)
    if tracker is not None:
        tracker.finish(summary)
    return StageResult(stage, run_dir, summary)


def fit(cfg: Config, stage: str, storage: str, name: str, label: str, tracker,
        failures_before: int) -> tuple[dict | None, dict | None]:
    """Train the stage: (the KdRayError payload that stopped it or None, the last metrics)."""
    run_dir = location(storage) / name
    stop_file = run_dir / STOP_FILE
    if in_one_task(cfg):
        loop_config = {**make_loop_config(cfg, stage, storage, name), "stop_file": True}
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_ctrl_c(stop_file))
        return fit_in_task(cfg, loop_config, label, run_dir, tracker, failures_before)
    trainer = make_trainer(cfg, stage, storage, name, [MetricsCallback(str(run_dir), tracker=tracker)],
                           stop_file=stop_file)
    result = trainer.fit()
    return getattr(result, "return_value", None), result.metrics


def ray_names(storage: str, name: str) -> tuple[str, str]:
    """Ray's (storage_path, name) for the run folder ``storage/name``.

    Ray tags its metrics with the run name and fails on non-ASCII text; such a run gives Ray the
    run folder itself as storage and "." as its name: the same folder (Ray accepts checkpoints only
    inside it), named as the user wrote it.
    """
    if name.isascii() and name.isprintable():
        return storage, name
    return str(location(storage) / name), "."


class _Trainer(TorchTrainer):
    """A TorchTrainer whose driver-side Ctrl-C handler is ours (see ``on_ctrl_c``), and which
    starts no Ray Data machinery.

    Ray Train installs its own SIGINT handler in ``fit`` (in the main thread only), which aborts
    the workers at once and loses the epoch in progress; this hook is where it installs it.
    """

    stop_file: Path | None = None

    def _register_sigint_handler(self, controller):
        if self.stop_file is None:
            return super()._register_sigint_handler(controller)
        signal.signal(signal.SIGINT, on_ctrl_c(self.stop_file))

    def _create_default_callbacks(self):
        # Our workers read data through their own loaders, never Ray Datasets, yet Ray's datasets
        # callback starts a DatasetManager actor per worker group and imports ray.data on every
        # worker: ~2-3 CPU s of a run's ~25 on 2 cores. Without datasets it has nothing to do.
        callbacks = super()._create_default_callbacks()
        if self.datasets or DatasetsCallback is None:
            return callbacks
        return [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]


def on_ctrl_c(stop_file: Path):
    """The first Ctrl-C asks every rank to stop after the current epoch's checkpoint, or after one
    written mid-epoch now if the epoch would outlast run.stop_grace_s (a file the workers read);
    the second raises KeyboardInterrupt, which stops at once."""
    count = 0

    def handler(signum, frame):
        nonlocal count
        count += 1
        if count > 1:
            raise KeyboardInterrupt
        stop_file.write_bytes(b"")  # a local file or an object alike
        log.warning("Ctrl-C: stopping after the current epoch's checkpoint (or at a checkpoint written "
                    "now if the epoch would outlast run.stop_grace_s); Ctrl-C again stops at once")

    return handler


def make_trainer(cfg: Config, stage: str, storage: str, name: str, callbacks: list,
                 stop_file: Path | None = None) -> TorchTrainer:
    """The ``TorchTrainer`` of one stage; ``kd-ray tune`` builds each trial's with this too.

    ``stop_file``: where the driver's first Ctrl-C asks the workers to stop (a stage's own run).
    """
    loop_config = make_loop_config(cfg, stage, storage, name)
    loop_config["stop_file"] = stop_file is not None  # the workers look for it mid-epoch too
    # Ray's own barrier in ray.train.report waits no longer than the process group does (its
    # controller reads this variable from the driver's environment).
    os.environ["RAY_TRAIN_COLLECTIVE_TIMEOUT_S"] = str(cfg.run.collective_timeout_s)
    ray_storage, ray_name = ray_names(storage, name)
    trainer = _Trainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(timeout_s=cfg.run.collective_timeout_s),
        scaling_config=ray.train.ScalingConfig(
            num_workers=tuple(cfg.run.num_workers) if cfg.run.elastic else cfg.run.num_workers,
            elastic_resize_monitor_interval_s=cfg.run.resize_interval_s, use_gpu=cfg.run.use_gpu,
            resources_per_worker=None if cfg.run.use_gpu else {"CPU": cfg.run.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=ray_name, storage_path=ray_storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level=cfg.run.ray_log_level),
        ),
    )
    trainer.stop_file = stop_file
    return trainer


def make_loop_config(cfg: Config, stage: str, storage: str, name: str) -> dict:
    """What worker.train_loop gets: the config, the stage, the run folder (and a chaos plan)."""
    loop_config = {"config": cfg.to_dict(), "stage": stage, "run_dir": str(location(storage) / name)}
    if os.environ.get(FAULTS_ENV):  # the chaos suite's fault plan; never set in user runs
        loop_config["faults"] = importlib.import_module(FAULTS_MODULE).from_env()
    return loop_config


def raise_user_error(exc: Exception) -> None:
    """Re-raise the user-fixable error a worker hit, as one line, instead of Ray's wrapper."""
    found = user_error_of_workers(getattr(exc, "worker_failures", None) or {})
    if found is not None:
        raise found from exc


def raise_returned_error(payload: dict | None) -> None:
    """Raise the KdRayError that stopped every worker at once (see worker.shared_error): the
    payload a run's workers returned, None when none did."""
    error = from_payload(payload)
    if error is not None:
        raise error
