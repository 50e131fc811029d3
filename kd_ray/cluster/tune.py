"""``kd-ray tune``: a Ray Tune sweep whose every trial is a distributed distillation run.

Train V2 pattern: the Tune trainable is a small driver (0.01 CPU) that builds the stage's
``TorchTrainer`` (stage.make_trainer) with ``TuneReportCallback``; the trial's Train run is
``<sweep>/trials/trial-<id>``, so a rerun trial resumes from its own checkpoints. A 1-worker
trial skips the TorchTrainer and trains in its Tune actor (cluster.trial).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import ray
import ray.train
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import TBXLoggerCallback

from kd_ray.cluster.cache import resolve_cache
from kd_ray.cluster.callbacks import MetricsCallback
from kd_ray.cluster.session import ensure_ray
from kd_ray.cluster.stage import make_trainer, raise_returned_error, raise_user_error, run_stage
from kd_ray.cluster.trial import (actor_resources, fit_tuner, forget_errors, in_actor,
                                  train_in_actor, tune_row)
from kd_ray.config import Config, load_config
from kd_ray.config.sweep import apply_params, planned_trials, space_entry
from kd_ray.errors import ConfigError, one_line, user_error_in
from kd_ray.log import get
from kd_ray.runs.stages import check_sweep
from kd_ray.runs.sweep_report import TRIALS_DIR, write_sweep_report
from kd_ray.runs.tracking import allow_file_store, tracking_uri
from kd_ray.storage import append_text, location, storage_root

log = get(__name__)
SWEEP_FILE = "sweep.yaml"  # the resolved config a sweep ran with; --resume reads it
TUNE_DIR = "tune"  # Tune's experiment folder (trial state, TensorBoard files per trial)
DRIVER_CPUS = 0.01  # a trial's own driver; 0 is refused by Ray
STARTS_FILE = "starts.log"
TIMING_FILE = "timing.jsonl"  # when each attempt of a trial started and finished (bench_kd reads it)


def search_space(cfg: Config) -> dict:
    """Tune's param_space from ``sweep.space`` (grid keys become choices under optuna)."""
    space = {}
    for key, spec in cfg.sweep.space.items():
        _, _, kind, values = space_entry(key, spec)
        if kind == "grid" and cfg.sweep.search != "optuna":
            space[key] = tune.grid_search(values)
        elif kind in ("grid", "choice"):
            space[key] = tune.choice(values)
        else:
            space[key] = getattr(tune, kind)(*values)
    return space


def trials_that_fit(cfg: Config) -> int:
    """How many trials the cluster runs at once; a ConfigError when not even one fits."""
    resources = ray.cluster_resources()
    if cfg.run.use_gpu:
        kind, per_trial = "GPU", float(cfg.run.num_workers)
    else:
        kind, per_trial = "CPU", cfg.run.num_workers * cfg.run.cpus_per_worker + driver_cpus(cfg)
    have = resources.get(kind, 0.0)
    fits = int(have // per_trial) if per_trial else 0
    if fits < 1:
        raise ConfigError(f"one trial needs {per_trial:g} {kind} (run.num_workers="
                          f"{cfg.run.num_workers}) but the cluster has {have:g}: lower "
                          "run.num_workers or add nodes")
    wanted = cfg.sweep.max_concurrent_trials
    return min(fits, wanted) if wanted else fits


def driver_cpus(cfg: Config) -> float:
    """A Train trial's own driver; none for a 1-worker trial, which trains in its actor."""
    return 0.0 if in_actor(cfg) else DRIVER_CPUS


def run_trial(params: dict, base: dict, sweep_dir: str) -> None:
    """The Tune trainable: one distillation run with this trial's values."""
    started = time.time()
    cfg = apply_params(Config.from_dict(base), params)
    name = f"trial-{tune.get_context().get_trial_id()}"
    storage = location(sweep_dir) / TRIALS_DIR
    run_dir = storage / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.replace(run={"name": name}).save(run_dir / "config.yaml")
    # one line per (re)start of this trial
    append_text(run_dir / STARTS_FILE, f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}\n")
    append_text(run_dir / TIMING_FILE, json.dumps({"started": started}) + "\n")
    try:
        if in_actor(cfg):  # no TorchTrainer start (cluster.trial)
            return train_in_actor(cfg, str(storage), name)
        # metrics.jsonl first: Tune may stop the trial as soon as it hears of the last epoch.
        callbacks = [MetricsCallback(str(run_dir), tensorboard=False), EpochReportCallback(cfg.sweep.metric)]
        result = make_trainer(cfg, "distill", str(storage), name, callbacks).fit()
    except ray.train.TrainingFailedError as exc:
        raise_user_error(exc)
        raise
    finally:  # Tune may stop a Train trial (ASHA) in fit(): then this line is not written
        append_text(run_dir / TIMING_FILE, json.dumps({"finished": time.time()}) + "\n")
    raise_returned_error(getattr(result, "return_value", None))  # a NaN loss or bad image stopped every worker (no retry used)


def _trial_dirname(trial) -> str:
    return f"trial-{trial.trial_id}"


class EpochReportCallback(TuneReportCallback):
    """A Train trial's reports to Tune, as cluster.trial.tune_row orders them."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        super().after_report(run_context, [tune_row(self.metric, metrics[0]), *metrics[1:]], checkpoint)


def make_tuner(cfg: Config, sweep_dir, restore: bool = False):
    """The Tuner of a new sweep, or of the interrupted one in ``sweep_dir`` (``restore``)."""
    direct = in_actor(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), sweep_dir=str(sweep_dir)),
        actor_resources(cfg) if direct else {"CPU": DRIVER_CPUS},
    )
    if restore:
        # Finished trials keep their results; unfinished and errored ones run again and
        # their Train runs resume from their last checkpoint.
        return tune.Tuner.restore(str(sweep_dir / TUNE_DIR), trainable=trainable, resume_errored=True)
    sweep = cfg.sweep
    scheduler = None
    if sweep.scheduler == "asha":
        scheduler = asha(cfg)
    if sweep.search == "optuna":
        search_alg = _optuna(sweep.seed)
    else:
        # Tune ignores max_concurrent_trials for a generator passed in: give it here.
        search_alg = tune.search.BasicVariantGenerator(random_state=sweep.seed,
                                                       max_concurrent=trials_that_fit(cfg))
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples, scheduler=scheduler,
            search_alg=search_alg, max_concurrent_trials=trials_that_fit(cfg),
            trial_dirname_creator=_trial_dirname, reuse_actors=direct),  # torch imported once
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=str(sweep_dir), verbose=1,
            callbacks=[TBXLoggerCallback(), *mlflow_callbacks(cfg)],
            # A Train trial retries its workers itself; an actor trial is retried by Tune.
            failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures if direct else 0)),
    )


def grace_epochs(cfg: Config) -> int:
    """ASHA's grace period: no trial is judged before its learning-rate warm-up is over (under the
    default 1-epoch warm-up a trial's first epoch says little of where it ends)."""
    warmed = math.ceil(cfg.optim.warmup_epochs) + 1 if cfg.optim.warmup_epochs else 1
    return min(max(cfg.sweep.grace_period, warmed), cfg.optim.epochs)


def asha(cfg: Config):
    return tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=cfg.optim.epochs,
                                         grace_period=grace_epochs(cfg),
                                         reduction_factor=cfg.sweep.reduction_factor)


def mlflow_callbacks(cfg: Config) -> list:
    """run.tracker=mlflow: Ray's own MLflow logger, one MLflow run per trial (params: the trial's
    sampled values; metrics: every epoch's report, step = epoch) in the sweep's experiment."""
    if cfg.run.tracker != "mlflow":
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback  # local: needs the mlflow extra

    uri = tracking_uri(cfg)
    allow_file_store(uri)  # the callback runs in this (the driver's) process
    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=cfg.run.name)]


def _optuna(seed: int):
    try:  # local: an optional extra
        import optuna
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("sweep.search=optuna needs Optuna: pip install 'kd_ray[optuna]' "
                          "(or use sweep.search=random)") from None
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))


def run_sweep(cfg: Config, train_teacher: bool = False, checked: bool = False):
    """Check (unless the caller did: ``checked``), train the teacher once (optional), run every
    trial, write the summary."""
    cfg = cfg if checked else check_sweep(cfg, train_teacher)
    sweep_dir = location(storage_root(cfg.run.storage)) / cfg.run.name
    if (sweep_dir / TUNE_DIR).exists():
        raise ConfigError(f"{sweep_dir} already holds a sweep: resume it with `kd-ray tune --resume "
                          f"{sweep_dir}`, or pick another run.name")
    ensure_ray(cfg, extra_cpus=driver_cpus(cfg))
    trials_that_fit(cfg)  # a trial too big for the cluster fails now, not after the teacher
    if train_teacher:
        teacher = run_stage(cfg, "teacher", storage=str(sweep_dir), name="teacher")
        cfg = cfg.replace(distill={"teacher_path": teacher.summary["teacher_file"]})
    # Built once here; every trial reads it (T and alpha only change the loss).
    cfg = resolve_cache(cfg, sweep_dir / "teacher_cache")
    cfg.save(sweep_dir / SWEEP_FILE)
    log.info(f"sweep {cfg.run.name}: {_describe(cfg)}; results in {sweep_dir}")
    results = fit_tuner(make_tuner(cfg, sweep_dir))
    return write_sweep_report(cfg, sweep_dir, trial_results(cfg, results))


def resume_sweep(sweep_dir) -> tuple:
    """Finish an interrupted sweep with the config it started with."""
    sweep_dir = location(storage_root(sweep_dir))
    if not (sweep_dir / SWEEP_FILE).is_file() or not tune.Tuner.can_restore(str(sweep_dir / TUNE_DIR)):
        raise ConfigError(f"{sweep_dir} holds no sweep to resume (no {SWEEP_FILE} or Tune state); "
                          "pass the folder `kd-ray tune` printed")
    cfg = load_config(sweep_dir / SWEEP_FILE)
    if cfg.run.tracker == "mlflow":  # Tune restores its MLflow logger with the sweep's state
        allow_file_store(tracking_uri(cfg))
    ensure_ray(cfg, extra_cpus=driver_cpus(cfg))
    resolve_cache(cfg, sweep_dir / "teacher_cache")  # still there and matching (or rebuilt)
    forget_errors(sweep_dir / TRIALS_DIR)
    states = trial_states(sweep_dir)
    done = sum(status == "TERMINATED" for status in states.values())
    log.info(f"resuming sweep {sweep_dir}: {done} of {planned_trials(cfg.sweep)} trials finished and "
             "kept; the others run (again) from their last checkpoint")
    results = fit_tuner(make_tuner(cfg, sweep_dir, restore=True))
    return write_sweep_report(cfg, sweep_dir, trial_results(cfg, results))


def trial_states(sweep_dir) -> dict[str, str]:
    """Trial id -> Tune status (PENDING, RUNNING, TERMINATED, ERROR) as last saved by Tune."""
    files = sorted((location(sweep_dir) / TUNE_DIR).glob("experiment_state-*.json"), key=lambda p: p.name)
    if not files:
        return {}
    states = {}
    for trial_json, _ in json.loads(files[-1].read_text())["trial_data"]:
        trial = json.loads(trial_json)
        states[trial["trial_id"]] = trial["status"]
    return states


def _describe(cfg: Config) -> str:
    keys = ", ".join(f"{k}={v}" for k, v in cfg.sweep.space.items())
    sched = (f"ASHA (grace {grace_epochs(cfg)}, factor {cfg.sweep.reduction_factor:g})"
             if cfg.sweep.scheduler == "asha" else "no early stopping")
    return (f"{keys}; {planned_trials(cfg.sweep)} trials of {cfg.optim.epochs} epochs on "
            f"{cfg.run.num_workers} worker(s) each, {sched}")


def trial_results(cfg: Config, results) -> list[dict]:
    """Tune's results as the plain rows ``runs.sweep_report`` reads."""
    return [{"name": Path(r.path).name, "params": {k: r.config.get(k) for k in cfg.sweep.space},
             "error": trial_error(r), "last": r.metrics} for r in results]


def trial_error(result) -> str | None:
    """A failed trial's error as one line (our own errors without Ray's wrappers)."""
    if result.error is None:
        return None
    return one_line(user_error_in(result.error) or result.error)
