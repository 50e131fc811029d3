"""Check a stage on the driver, run it as a Ray Train ``TorchTrainer``, and file its results."""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
from dataclasses import dataclass
from pathlib import Path

from kd_ray import checkpoints
from kd_ray.config import Config
from kd_ray.errors import ConfigError, KdRayError, RunFailedError
from kd_ray.recovery import check_resume, failure_message, fresh_name, quiet, raise_returned_error
from kd_ray.tb_callback import MetricsCallback, ProgressPrinter, backfill, read_failures

TEACHER_FILE = "teacher.pt"


@dataclass
class StageResult:
    stage: str
    run_dir: Path
    summary: dict


def preflight(cfg: Config, stage: str, teacher_pending: bool = False) -> Config:
    """Catch bad input on the driver, before any worker starts. Returns the config to run.

    ``teacher_pending``: the teacher file is still to be trained (pipeline), so skip its checks.
    """
    from kd_ray.data import describe
    from kd_ray.losses import get_loss
    from kd_ray.models import (MODELS, PRETRAINED_FIX, check_teacher_matches, read_teacher_info,
                                require_file)
    from kd_ray.train_loop import stage_model

    cfg = cfg.with_absolute_paths()
    arch, pretrained = stage_model(cfg, stage)
    MODELS.get(arch)
    if pretrained:
        require_file(pretrained, ConfigError, "pretrained weights", PRETRAINED_FIX)
    loss_name = cfg.distill.loss if stage == "distill" else "ce"
    _, needs_teacher = get_loss(loss_name)
    info = describe(cfg.data)
    if stage == "distill" and needs_teacher and not teacher_pending:
        if not cfg.distill.teacher_path:
            raise ConfigError("distill needs a teacher: set distill.teacher_path to a teacher.pt "
                              "from `kd-ray train-teacher`, or run `kd-ray pipeline`")
        teacher = read_teacher_info(cfg.distill.teacher_path)
        check_teacher_matches(teacher, info.classes)
        if cfg.data.image_size is None and teacher.get("image_size"):
            cfg = cfg.replace(data={"image_size": teacher["image_size"]})
    return cfg


def ensure_ray(cfg: Config, extra_cpus: float = 0.0) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one sized for this run.

    ``extra_cpus``: CPUs beyond the workers' (a Tune trial's own driver).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local use; clusters set their own
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    # A laptop-sized local instance has no preemption to watch for.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    needed = math.ceil(cfg.run.num_workers * cfg.run.cpus_per_worker)
    # Oversubscribe a small machine rather than wait forever for CPUs it does not have, plus
    # one logical CPU for the trials' tiny drivers so they never take a worker's place.
    # The dashboard (and its job server) stays on loopback unless run.dashboard_host says otherwise.
    start_local_ray(num_cpus=max(os.cpu_count() or 1, needed) + math.ceil(extra_cpus),
                    dashboard_host=cfg.run.dashboard_host, include_dashboard=True)


def start_local_ray(**init_kwargs):
    """``ray.init`` of a new local instance whose processes all know its address (see below)."""
    import ray

    _pin_local_address()
    return ray.init(address="local", **init_kwargs)


def _pin_local_address() -> None:
    """Give the local instance a known GCS port and put it in RAY_ADDRESS before it starts.

    Ray's helper processes (Train's placement-group cleaner among them) find their cluster through
    RAY_ADDRESS, else by scanning for running instances: with a second Ray instance on the machine
    they cannot choose, and a sweep's finished trials would keep their CPUs forever. Processes
    the local instance starts inherit this environment.
    """
    import ray.util

    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"


def check_resources(cfg: Config) -> None:
    import ray

    resources = ray.cluster_resources()
    kind = "GPU" if cfg.run.use_gpu else "CPU"
    per_worker = 1.0 if cfg.run.use_gpu else cfg.run.cpus_per_worker
    needed, have = cfg.run.num_workers * per_worker, resources.get(kind, 0.0)
    if needed > have:
        raise ConfigError(f"run.num_workers={cfg.run.num_workers} needs {needed:g} {kind} but the "
                          f"cluster has {have:g}: lower run.num_workers or add nodes")


def run_stage(cfg: Config, stage: str, storage: str | None = None, name: str | None = None,
              verbose: bool = True, new: bool = False) -> StageResult:
    """Train one stage (teacher, student or distill) and return where its results are.

    An existing run of the same name resumes from its last usable checkpoint; ``new`` starts a
    fresh run beside it instead (``<name>-2``, ``<name>-3``, ...).
    """
    import ray.train

    from kd_ray.train_loop import stage_epochs

    cfg = preflight(cfg, stage)
    storage = str(Path(storage or cfg.run.storage).expanduser().resolve())
    name = name or cfg.run.name
    if new:
        name = fresh_name(Path(storage), name)
    run_dir = Path(storage) / name
    done = finished_summary(run_dir, stage_epochs(cfg, stage))
    if done is not None:
        if verbose:
            print(f"[kd_ray] {name} already finished {done['epochs']} epochs; skipping "
                  f"(delete {run_dir} to train it again)", flush=True)
        return StageResult(stage, run_dir, done)
    if stage == "distill":  # teacher logits once for all epochs (distill.teacher_cache)
        from kd_ray.teacher_cache import resolve

        cfg = resolve(cfg, Path(storage) / "teacher_cache")
    resume = check_resume(cfg, stage, run_dir, warn=print if verbose else quiet)
    ensure_ray(cfg)
    check_resources(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    label = f"{name} ({stage})"
    if verbose:
        print(f"[kd_ray] {label}: {stage_epochs(cfg, stage)} epochs on {cfg.run.num_workers} "
              f"worker(s), results in {run_dir}", flush=True)
    if resume:
        if verbose:
            done = "epoch 1" if resume["epoch"] == 1 else f"epochs 1-{resume['epoch']}"
            print(f"[kd_ray] resuming {name} from epoch {resume['epoch'] + 1} ({done} done, "
                  f"{run_dir.name}/{resume['folder']}); --new starts a fresh run beside it", flush=True)
        backfill(run_dir, resume.get("history", []))  # epochs whose metrics line was lost
    failures_before = len(read_failures(run_dir))
    trainer = make_trainer(cfg, stage, storage, name, [MetricsCallback(str(run_dir))])
    try:
        if verbose:
            with ProgressPrinter(run_dir, label):
                result = trainer.fit()
        else:
            result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise_user_error(exc)
        raise RunFailedError(failure_message(cfg, run_dir, failures_before, exc)) from exc
    raise_returned_error(result)
    summary = summarize(cfg, stage, run_dir, result)
    return StageResult(stage, run_dir, summary)


def make_trainer(cfg: Config, stage: str, storage: str, name: str, callbacks: list):
    """The ``TorchTrainer`` of one stage; ``kd-ray tune`` builds each trial's with this too."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from kd_ray import faults
    from kd_ray.train_loop import train_loop_per_worker

    loop_config = {"config": cfg.to_dict(), "stage": stage, "run_dir": str(Path(storage) / name)}
    plan = faults.from_env()  # the chaos suite's fault plan; never set in user runs
    if plan:
        loop_config["faults"] = plan
    # Ray's own barrier in ray.train.report waits no longer than the process group does (its
    # controller reads this variable from the driver's environment).
    os.environ["RAY_TRAIN_COLLECTIVE_TIMEOUT_S"] = str(cfg.run.collective_timeout_s)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(timeout_s=cfg.run.collective_timeout_s),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
            resources_per_worker=None if cfg.run.use_gpu else {"CPU": cfg.run.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level=cfg.run.ray_log_level),
        ),
    )


def summarize(cfg: Config, stage: str, run_dir: Path, result) -> dict:
    """Export the teacher (teacher stage) and write summary.json beside the run."""
    from kd_ray.models import build_model, count_params, export_teacher

    found = checkpoints.latest(run_dir, with_state=True, warn=quiet)
    if found is None:
        raise RunFailedError(f"{run_dir} holds no usable checkpoint after training; rerun to train again")
    folder, _, state = found
    model = build_model(state["arch"], len(state["classes"]))
    model.load_state_dict(state["model"])
    history = read_history(run_dir)
    speeds = [h["perf/images_per_s"] for h in history if math.isfinite(h["perf/images_per_s"])]
    summary = {
        "stage": stage, "run": run_dir.name, "arch": state["arch"], "params": count_params(model),
        "seed": cfg.run.seed, "epochs": state["epoch"], "classes": state["classes"],
        # The last epoch's metrics (history survives a resume that had nothing left to train).
        "final": {k: v for k, v in (history[-1] if history else result.metrics or {}).items()
                  if isinstance(v, (int, float)) and k != "time"},
        "best_top1": max((h.get("val/top1", 0.0) for h in history), default=None),
        "images_per_s": statistics.median(speeds) if speeds else None,
        "checkpoint": str(folder),
    }
    if stage == "distill":
        summary.update(loss=cfg.distill.loss, temperature=cfg.distill.temperature,
                       alpha=cfg.distill.alpha, teacher=cfg.distill.teacher_path)
    if stage == "teacher":
        path = run_dir / TEACHER_FILE
        export_teacher(path, model, state["arch"], state["classes"], state["image_size"],
                       extra={"run": str(run_dir), "val_top1": summary["final"].get("val/top1")})
        summary["teacher_file"] = str(path)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def finished_summary(run_dir: Path, epochs: int) -> dict | None:
    """The summary of a run that already trained ``epochs`` epochs, else None."""
    path = run_dir / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
        if summary.get("epochs", 0) >= epochs:
            return summary
    return None


def read_history(run_dir: Path) -> list[dict]:
    """Per-epoch metrics written by the callback; a resumed run's later lines win."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    by_epoch = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_epoch[row["epoch"]] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def raise_user_error(exc: Exception) -> None:
    """Re-raise the user-fixable error a worker hit, as one line, instead of Ray's wrapper."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        found = user_error_in(failure)
        if found is not None:
            raise type(found)(f"{one_line(found)} (rank {rank})") from exc


def user_error_in(error: BaseException | None) -> KdRayError | None:
    """Our own error inside Ray's wrappers (causes, RayTaskError(...) subclasses), if any."""
    while error is not None:
        if isinstance(error, KdRayError):
            return error
        error = error.__cause__ or getattr(error, "cause", None)
    return None


def one_line(error: Exception) -> str:
    """The message itself, also when a DataLoader worker wrapped it in its traceback text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else repr(error)
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last
