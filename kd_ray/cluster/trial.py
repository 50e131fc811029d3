"""A 1-worker sweep trial that trains in its own Tune actor (``sweep.trial_runner: auto``).

A TorchTrainer start costs every trial 12-13 s on 2 cores before even an empty loop runs (bench_kd
FLOOR: a controller actor, a worker actor, their imports and polls). One worker has no DDP to set
up, so the trial's actor runs the same loop (worker.train_loop) itself. Its run folder is a Train
run's (checkpoints, metrics.jsonl): a retried or resumed trial starts from its last checkpoint.
"""
from __future__ import annotations

import json
import signal
import threading

from ray import tune

from kd_ray.cluster.single import SingleSession
from kd_ray.cluster.stage import make_loop_config
from kd_ray.cluster.worker import train_loop
from kd_ray.config import Config
from kd_ray.errors import KdRayError, describe, from_payload, to_payload
from kd_ray.runs.files import append_failure
from kd_ray.storage import location

ERROR_FILE = "error.json"  # the error no retry can fix that stopped this trial (Tune retries anyway)


def fit_tuner(tuner):
    """``tuner.fit()``, then the SIGINT handler from before it: Tune installs its own and keeps it
    after the run, and a later SIGTERM (which goes where Ctrl-C goes) would only set Tune's flag."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()
    before = signal.getsignal(signal.SIGINT)
    try:
        return tuner.fit()
    finally:
        signal.signal(signal.SIGINT, before)


def in_actor(cfg: Config) -> bool:
    return cfg.sweep.trial_runner == "auto" and cfg.run.num_workers == 1


def actor_resources(cfg: Config) -> dict:
    """What the trial's actor reserves: one worker's (a Train trial's driver takes DRIVER_CPUS)."""
    return {"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})}


def tune_row(metric: str, metrics: dict) -> dict:
    """An epoch's report for Tune: ``timesteps_total = epoch`` (TensorBoard's step is the epoch,
    also after a resume) and the sweep's metric first (Tune's live table shows the first four)."""
    first = [metric, "val/top1", "val/loss", "train/loss"]
    row = {k: metrics[k] for k in first if k in metrics}
    row.update(metrics, timesteps_total=metrics.get("epoch"))
    return row


class TrialSession(SingleSession):
    """worker.train_loop's side in a Tune actor: a single-process run (cluster.single) whose
    every epoch also goes to Tune."""

    def __init__(self, cfg: Config, run_dir):
        super().__init__(cfg, run_dir, tensorboard=False)  # the Tuner writes TensorBoard
        self.metric = cfg.sweep.metric

    def report(self, metrics: dict, state: dict | None, run_dir, history: list) -> None:
        super().report(metrics, state, run_dir, history)  # first: Tune may stop the trial here
        tune.report(tune_row(self.metric, metrics))


def train_in_actor(cfg: Config, storage: str, name: str) -> None:
    """Train the trial here; raises the KdRayError that stopped it (and again on Tune's retries)."""
    run_dir = location(storage) / name
    stopped = run_dir / ERROR_FILE
    if stopped.exists():  # a NaN loss or a bad image: a retry would fail the same way
        raise from_payload(json.loads(stopped.read_text()))
    try:
        payload = train_loop(make_loop_config(cfg, "distill", storage, name), TrialSession(cfg, run_dir))
    except KdRayError as exc:  # found while setting up (data, layers): no retry fixes it either
        payload = to_payload(exc)
    except Exception as exc:  # Tune retries the trial (run.max_failures) from its checkpoint
        append_failure(run_dir, {"0": describe(exc)})
        raise
    error = from_payload(payload)
    if error is not None:
        stopped.write_text(json.dumps(payload))
        raise error


def forget_errors(trials_dir) -> None:
    """`tune --resume` trains errored trials again: the cause may be fixed by now."""
    folder = location(trials_dir)
    if folder.exists():
        for trial in folder.iterdir():
            if trial.is_dir():
                (trial / ERROR_FILE).unlink(missing_ok=True)
