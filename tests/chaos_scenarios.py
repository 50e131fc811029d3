"""The chaos suite: kd-ray runs through failures, and what each failure costs.

Every scenario trains on a small synthetic data set with 2 Ray workers (1 where the rank count is
not the point: T4, T7, T10, T12, T14), injects its fault
through ``KD_RAY_FAULTS`` (see kd_ray/testing/faults.py) or kills a process from outside, and returns a Row
of figures and named checks. ``python scripts/chaos.py`` prints the rows as a table;
``tests/test_chaos.py`` asserts the checks. The calling process must have joined a Ray
instance; ``env`` is the environment for kd-ray subprocesses (its RAY_ADDRESS).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from kd_ray.engine import checkpoints
from kd_ray.runs.files import STOP_FILE, read_failures, read_history
from kd_ray.testing.faults import ENV, read_events

# Fast failure detection for a small local instance (see DESIGN.md).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
           "RAY_DEDUP_LOGS": "0"}
SYNTHETIC = ["data.name=synthetic", "data.synthetic_size=256", "data.image_size=16",
             "model.student=tiny_cnn", "model.teacher=tiny_cnn", "optim.batch_size=32",
             "run.num_workers=2", "run.threads_per_worker=1", "distill.teacher_cache='off'"]
# Where the rank count is not the point (a driver killed or run twice, a damaged checkpoint,
# Ctrl-C between epochs) one worker, which trains in one Ray task (run.runner auto, the default):
# a TorchTrainer costs ~17 CPU seconds of start-up here.
ONE_WORKER = ("run.num_workers=1",)
STALL_TIMEOUT_S, STALL_MARGIN_S = 10, 30


@dataclass
class Row:
    test: str
    scenario: str
    figures: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)  # what must hold -> whether it did
    run_dir: Path | None = None

    @property
    def failed(self) -> list[str]:
        return [name for name, ok in self.checks.items() if not ok]


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    seconds: float

    @property
    def error(self) -> str:
        lines = [line for line in self.err.splitlines() if line.startswith("kd-ray: error:")]
        return lines[-1] if lines else ""

    @property
    def short_error(self) -> str:
        text = self.error.removeprefix("kd-ray: error: ").removeprefix("training failed: ")
        return text if len(text) <= 90 else text[:87] + "..."


def settings(work: Path, name: str, *extra: str, base=SYNTHETIC) -> list[str]:
    argv = []
    for item in [*base, f"run.storage={work}", f"run.name={name}", *extra]:
        argv += ["--set", item]
    return argv


def kd_ray(argv: list, env: dict, faults_dir=None, faults=(), inline=False, timeout=600) -> Outcome:
    """One kd-ray command: in this process (``inline``) or as a subprocess, with a fault plan."""
    plan = json.dumps({"dir": str(faults_dir), "faults": list(faults)}) if faults_dir else None
    start = time.perf_counter()
    if not inline:
        env = {k: v for k, v in env.items() if k != ENV} | ({ENV: plan} if plan else {})
        done = subprocess.run([sys.executable, "-m", "kd_ray.cli", *map(str, argv)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        return Outcome(done.returncode, done.stdout, done.stderr, time.perf_counter() - start)
    from kd_ray.cli import main

    out, err, saved = io.StringIO(), io.StringIO(), os.environ.pop(ENV, None)
    if plan:
        os.environ[ENV] = plan
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exc:  # argparse refusing the command line
                code = exc.code
    finally:
        os.environ.pop(ENV, None)
        if saved is not None:
            os.environ[ENV] = saved
    return Outcome(code, out.getvalue(), err.getvalue(), time.perf_counter() - start)


def resumed_line(out: str) -> str:
    """The driver's "resuming <run> from epoch k" line, without its details."""
    line = next((line for line in out.splitlines() if line.startswith("[kd_ray] resuming")), "")
    return line.removeprefix("[kd_ray] ").split(" (")[0]


def epochs_rerun(events: list) -> int:
    """Epochs that rank 0 started more than once (work lost to a failure)."""
    starts = [e["epoch"] for e in events if e["event"] == "epoch_start" and e["rank"] == 0]
    return len(starts) - len(set(starts))


def attempts(events: list) -> list[dict]:
    return [e for e in events if e["event"] == "attempt" and e["rank"] == 0]


def logged_epochs(run_dir: Path) -> list[int]:
    """Epoch of every metrics.jsonl line, in order (a duplicate or a gap shows here)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["epoch"] for line in lines if line.strip()]


def tensorboard_steps(run_dir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: sorted(e.step for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def t1_worker_raises(work: Path, env: dict) -> Row:
    out = kd_ray(["train-student", *settings(work, "t1", "optim.epochs=3", "run.max_failures=1")], env, work / "t1-faults",
                 [{"kind": "raise", "rank": 1, "epoch": 2, "step": 2, "once": True}], inline=True)
    run_dir, events = work / "t1", read_events(work / "t1-faults")
    restarts, rerun = len(read_failures(run_dir)), epochs_rerun(events)
    return Row("T1", "rank 1 raises in epoch 2, max_failures=1",
               {"exit": out.code, "restarts": restarts, "epochs re-run": rerun, "wall s": out.seconds},
               {"run finishes": out.code == 0, "restarts = 1": restarts == 1, "epochs re-run <= 1": rerun <= 1,
                "epochs 1-3 logged once": logged_epochs(run_dir) == [1, 2, 3]}, run_dir)


def t2_fails_every_attempt(work: Path, env: dict) -> Row:
    out = kd_ray(["train-student", *settings(work, "t2", "optim.epochs=2", "run.max_failures=2")], env, work / "t2-faults",
                 [{"kind": "raise", "rank": 1, "epoch": 1, "step": 1}], inline=True)
    tries = len(attempts(read_events(work / "t2-faults")))
    shown = "rank 1: RuntimeError: chaos: injected failure on rank 1" in out.error
    return Row("T2", "rank 1 fails on every attempt, max_failures=2",
               {"exit": out.code, "attempts": tries, "wall s": out.seconds, "error": out.short_error},
               {"3 attempts": tries == 3 and len(read_failures(work / "t2")) == 3,
                "non-zero exit": out.code != 0, "first error shown": shown})


def t3_worker_killed(work: Path, env: dict) -> Row:
    out = kd_ray(["train-student", *settings(work, "t3", "optim.epochs=3", "run.max_failures=1")], env, work / "t3-faults",
                 [{"kind": "kill", "rank": 1, "epoch": 2, "step": 3, "once": True}], inline=True)
    run_dir, events = work / "t3", read_events(work / "t3-faults")
    kill = next((e["time"] for e in events if e["event"] == "fault"), None)
    again = next((e["time"] for e in events if kill and e["event"] == "epoch_start" and e["rank"] == 0
                  and e["time"] > kill), None)
    back = round(again - kill, 1) if kill and again else None
    lost = epochs_rerun(events)
    return Row("T3", "rank 1 SIGKILLed mid-epoch 2, max_failures=1",
               {"exit": out.code, "s kill -> training": back, "epochs lost": lost, "wall s": out.seconds},
               {"run finishes": out.code == 0, "restarted": back is not None, "epochs lost <= 1": lost <= 1,
                "epochs 1-3 logged once": logged_epochs(run_dir) == [1, 2, 3]}, run_dir)


HOLD_EPOCH_3 = [{"kind": "sleep", "rank": 0, "epoch": 3, "step": 0, "seconds": 120, "once": True}]


def kill_driver_after_epoch_2(argv: list, env: dict, run_dir, faults_dir) -> str:
    """Start ``kd-ray argv`` held at the start of epoch 3 (HOLD_EPOCH_3), SIGKILL its driver once
    two epochs are logged (or it ended), and return the fault plan for the rerun."""
    plan = json.dumps({"dir": str(faults_dir), "faults": HOLD_EPOCH_3})
    proc = subprocess.Popen([sys.executable, "-m", "kd_ray.cli", *argv], env=dict(env, **{ENV: plan}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_history(run_dir)) < 2 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return plan


def t4_driver_killed(work: Path, env: dict) -> Row:
    argv = ["train-student", *settings(work, "t4", "optim.epochs=4", *ONE_WORKER)]
    run_dir = work / "t4"
    kill_driver_after_epoch_2(argv, env, run_dir, work / "t4-faults")
    before = len(read_history(run_dir))
    out = kd_ray(argv, env, work / "t4-faults", HOLD_EPOCH_3, inline=True)  # the same command again
    resumed = "[kd_ray] resuming t4 from epoch 3 " in out.out
    return Row("T4", "driver SIGKILLed after epoch 2, same command again",
               {"epochs before kill": before, "rerun exit": out.code, "rerun s": out.seconds,
                "rerun prints": resumed_line(out.out)},
               {"killed after epoch 2": before == 2, "prints resuming t4 from epoch 3": resumed,
                "rerun finishes": out.code == 0, "epochs 1-4 logged once": logged_epochs(run_dir) == [1, 2, 3, 4]},
               run_dir)


def t5_sweep_killed(work: Path, env: dict) -> Row:
    from kd_ray.config import load_config
    from kd_ray.cluster.tune import STARTS_FILE, trial_states

    teacher = make_teacher(work / "t5-teacher.pt", [f"class{i}" for i in range(10)])
    config = work / "t5.yaml"
    # 1-worker trials (each runs in its Tune actor): what is resumed is the sweep, not a trial.
    load_config(overrides=[*SYNTHETIC, "run.num_workers=1", "optim.epochs=2", f"distill.teacher_path={teacher}", "run.name=t5",
                           f"run.storage={work}", "sweep.space={distill.temperature: [1, 2, 4, 8]}",
                           "sweep.scheduler=none", "sweep.max_concurrent_trials=1"]).save(config)
    sweep_dir = work / "t5"
    # Each trial holds 8 s in epoch 2 (a few seconds of training otherwise): the kill finds one done.
    hold = {"dir": str(work / "t5-faults"), "faults": [{"kind": "sleep", "epoch": 2, "step": 0, "seconds": 8}]}
    proc = subprocess.Popen([sys.executable, "-m", "kd_ray.cli", "tune", "-c", str(config)],
                            env=dict(env, **{ENV: json.dumps(hold)}), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while "TERMINATED" not in trial_states(sweep_dir).values() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = [t for t, status in trial_states(sweep_dir).items() if status == "TERMINATED"]
    out = kd_ray(["tune", "--resume", sweep_dir], env)
    rerun = sum(len((sweep_dir / "trials" / f"trial-{t}" / STARTS_FILE).read_text().splitlines()) > 1
                for t in finished)
    done = sum(status == "TERMINATED" for status in trial_states(sweep_dir).values())
    return Row("T5", "4-trial sweep driver SIGKILLed, tune --resume",
               {"finished before kill": len(finished), "finished trials rerun": rerun, "resume exit": out.code,
                "resume s": out.seconds, "trials done": done},
               {">= 1 trial finished before the kill": 1 <= len(finished) < 4, "resume finishes": out.code == 0,
                "0 finished trials rerun": rerun == 0, "all 4 trials done": done == 4})


def t6_rank_stalls(work: Path, env: dict) -> Row:
    before = alive_train_workers()
    out = kd_ray(["train-student", *settings(work, "t6", "optim.epochs=2", "run.max_failures=0",
                          f"run.collective_timeout_s={STALL_TIMEOUT_S}")], env, work / "t6-faults",
                 [{"kind": "stall", "rank": 1, "epoch": 1, "step": 2, "seconds": 150}], inline=True)
    ended = time.time()
    stall = next((e["time"] for e in read_events(work / "t6-faults") if e["event"] == "fault"), None)
    seconds = round(ended - stall, 1) if stall else None
    left = alive_train_workers(wait_for=before)
    return Row("T6", f"rank 1 stalls before a collective, timeout {STALL_TIMEOUT_S} s",
               {"exit": out.code, "s stall -> attempt failed": seconds, "actors left": left,
                "error": out.short_error},
               {"attempt fails": out.code == 1,
                f"within {STALL_TIMEOUT_S} + {STALL_MARGIN_S} s": seconds is not None
                and seconds <= STALL_TIMEOUT_S + STALL_MARGIN_S, "no actors left": left == 0})


def t7_truncated_checkpoint(work: Path, env: dict) -> Row:
    first = kd_ray(["train-student", *settings(work, "t7", "optim.epochs=2", *ONE_WORKER)], env, inline=True)
    newest, previous = checkpoints.folders(work / "t7")[:2]
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    out = kd_ray(["train-student", *settings(work, "t7", "optim.epochs=3", *ONE_WORKER)], env, inline=True)
    warned = any(newest.name in line and previous.name in line for line in out.out.splitlines())
    resumed = "[kd_ray] resuming t7 from epoch 2 " in out.out
    return Row("T7", "latest checkpoint truncated, rerun",
               {"first exit": first.code, "exit": out.code, "rerun s": out.seconds,
                "rerun prints": resumed_line(out.out)},
               {"warning names both": warned, "resumes from the previous one": resumed,
                "run finishes": out.code == 0, "epochs 1-3 logged once": logged_epochs(work / "t7") == [1, 2, 3]})


def t8_bad_input(work: Path, env: dict) -> list[Row]:
    """Each bad input: exit code, seconds to the error, Ray retries used (0 expected)."""
    from kd_ray.data import write_synthetic_imagefolder

    tree = write_synthetic_imagefolder(work / "t8-tree", num_classes=3, per_class=(16, 4), image_size=16)
    folder = ["data.name=imagefolder", f"data.root={tree}", "data.image_size=16", "model.student=tiny_cnn",
              "optim.batch_size=16", "run.num_workers=2", "distill.teacher_cache='off'"]
    good = make_teacher(work / "t8-teacher.pt", ["class0", "class1", "class2"])
    renamed = make_teacher(work / "t8-renamed.pt", ["class0", "class1", "cat"])
    cases = [("missing teacher", "distill", [f"distill.teacher_path={work}/nowhere.pt"], tree, "nowhere.pt"),
             ("wrong class count", "train-student", ["data.num_classes=5"], tree, "data.num_classes=5"),
             ("renamed classes", "distill", [f"distill.teacher_path={renamed}"], tree, "'cat'"),
             # Found by the worker as it reads the image (one worker, in one Ray task).
             ("corrupt image", "train-student", ONE_WORKER, _spoil(tree, work / "t8-corrupt", b"not a png"),
              "broken.png"),
             ("zero-byte image", "train-student", ONE_WORKER, _spoil(tree, work / "t8-empty", b""), "broken.png")]
    runs = {}
    for i, (what, command, extra, root, needle) in enumerate(cases):
        name = f"t8{'abcde'[i]}"
        runs[name] = ([command, *settings(work, name, f"data.root={root}", f"distill.teacher_path={good}", *extra,
                                         base=folder)], (), None)
    runs["t8f"] = (["train-student", *settings(work, "t8f", "optim.epochs=3")],
                   [{"kind": "nan", "rank": 1, "epoch": 2, "step": 3}], work / "t8f-faults")
    # A loss that pulls every image to class 0, no warm-up, 64 steps an epoch (past
    # guard.min_steps in epoch 1): deterministic, unlike a huge lr whose collapse comes when it may.
    runs["t8g"] = (["distill", *settings(work, "t8g", "optim.epochs=4", "optim.warmup_epochs=0", *ONE_WORKER,
                                         "data.synthetic_size=2048", "distill.loss=tests.plugins:pull_to_class_zero")],
                   (), None)
    # The two that train run as subprocesses side by side (a 2-worker run and a 1-worker one fit
    # the test instance's CPUs; every run has a folder of its own, so the seconds to the error are upper
    # bounds) while the five refused ones run in this process, one after another.
    with ThreadPoolExecutor(2) as pool:
        trained = {name: pool.submit(kd_ray, runs[name][0], env, runs[name][2], runs[name][1])
                   for name in ("t8g", "t8f")}
        outs = {name: kd_ray(runs[name][0], env, inline=True) for name in ("t8a", "t8b", "t8c", "t8d", "t8e")}
        outs.update({name: future.result() for name, future in trained.items()})
    rows = [_bad_input_row(name, what, outs[name], work / name, needle)
            for name, (what, _, _, _, needle) in zip(list(runs)[:5], cases)]
    row = _bad_input_row("t8f", "NaN loss at epoch 2 step 3 (rank 1)", outs["t8f"], work / "t8f", "epoch 2 step 3")
    row.checks["epoch 1 kept"] = logged_epochs(work / "t8f") == [1]
    planted = _bad_input_row("t8g", "planted collapse (every image pulled to class 0)", outs["t8g"],
                             work / "t8g", "optim.lr")
    planted.checks["stopped within 2 epochs"] = 1 <= len(logged_epochs(work / "t8g")) <= 2
    return rows + [row, planted]


def _bad_input_row(name: str, what: str, out: Outcome, run_dir: Path, needle: str) -> Row:
    retries = len(read_failures(run_dir))
    return Row(name.upper(), what, {"exit": out.code, "s to error": out.seconds, "retries": retries,
                                    "error": out.short_error},
               {"exit 2": out.code == 2, "0 retries": retries == 0, f"names {needle}": needle in out.error,
                "one line": out.err.count("kd-ray: error:") == 1})


def t9_tensorboard(rows: list[Row]) -> Row:
    """One point per epoch for each tag, after the restarts of T1 and T3."""
    figures, checks = {}, {}
    for row in rows:
        steps = tensorboard_steps(row.run_dir)
        bad = sorted(tag for tag, s in steps.items() if s != [1, 2, 3])
        figures[f"{row.test} tags"] = len(steps)
        figures[f"{row.test} tags off"] = len(bad)
        checks[f"{row.test}: each tag at epochs 1, 2, 3 once"] = bool(steps) and not bad
    return Row("T9", "TensorBoard after T1 and T3", figures, checks)


def make_teacher(path: Path, classes: list[str]) -> Path:
    import torch

    from kd_ray.models import build_model, export_teacher

    torch.manual_seed(0)
    export_teacher(path, build_model("tiny_cnn", len(classes)), "tiny_cnn", classes, 16)
    return path


def _spoil(tree: Path, copy: Path, data: bytes) -> Path:
    shutil.copytree(tree, copy)
    (copy / "train" / "class1" / "broken.png").write_bytes(data)
    return copy


def alive_train_workers(wait_for: int | None = None, seconds: float = 20) -> int:
    """Ray Train worker actors alive now (waiting up to ``seconds`` for at most ``wait_for``)."""
    from ray.util.state import list_actors

    deadline = time.time() + seconds
    while True:
        alive = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
        count = sum("RayTrainWorker" in (a.class_name or "") for a in alive)
        if wait_for is None or count <= wait_for or time.time() > deadline:
            return count if wait_for is None else count - wait_for
        time.sleep(0.5)


# ---- Issue 16: one owner per run, machine-sized local runs, names and paths, Ctrl-C ----

def _popen(argv: list, env: dict, plan: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in env.items() if k != ENV} | ({ENV: json.dumps(plan)} if plan else {})
    return subprocess.Popen([sys.executable, "-m", "kd_ray.cli", *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 300) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def lineages(run_dir: Path) -> int:
    """Distinct training histories among the run's checkpoints: 1 when each checkpoint's history
    is a prefix of the newest one's (same epochs, same values), more when two drivers mixed."""
    histories = [checkpoints.read_manifest(f).get("history", []) for f in checkpoints.folders(run_dir)]
    if not histories:
        return 0
    newest = histories[0]
    return 1 + sum(h != newest[:len(h)] for h in histories[1:])


def t10_two_drivers(work: Path, env: dict) -> Row:
    """A second driver on a running run is refused; the first one's lock, left by a SIGKILL, is
    taken over by the next driver, which resumes: one lineage, no epoch twice."""
    from kd_ray.runs.lock import LOCK_FILE, read_owner

    argv = ["train-student", *settings(work, "t10", "optim.epochs=3", *ONE_WORKER)]
    run_dir = work / "t10"
    first = _popen(argv, env, {"dir": str(work / "t10-faults"),  # holds the first driver in epoch 2
                               "faults": [{"kind": "sleep", "rank": 0, "epoch": 2, "step": 0, "seconds": 120}]})
    _wait_for(lambda: len(read_history(run_dir)) >= 1, first)
    second = kd_ray(argv, env, inline=True)  # the same command, while the first one trains
    owner = read_owner(run_dir) or {}
    first.send_signal(signal.SIGKILL)
    first.communicate()
    left = (run_dir / LOCK_FILE).exists()
    third = kd_ray(argv, env, inline=True)  # the lock's owner is gone: taken over, resumed
    logged = logged_epochs(run_dir)
    took_over = f"locked by kd-ray PID {first.pid}" in third.out and "taking it over" in third.out
    return Row("T10", "same run started twice; first driver SIGKILLed, run again",
               {"second exit": second.code, "second s": second.seconds, "takeover exit": third.code,
                "duplicate epochs": len(logged) - len(set(logged)), "lineages": lineages(run_dir),
                "checkpoints": len(checkpoints.folders(run_dir))},
               {"second refused, exit 2": second.code == 2,
                "names the owner's PID": f"PID {first.pid}" in second.error and owner.get("pid") == first.pid,
                "says wait or --new": "--new" in second.error, "stale lock left by SIGKILL": left,
                "taken over with a warning": took_over, "takeover finishes": third.code == 0,
                "epochs 1-3 logged once": logged == [1, 2, 3], "one lineage": lineages(run_dir) == 1,
                "keep_checkpoints=2 honoured": len(checkpoints.folders(run_dir)) == 2,
                "lock released": not (run_dir / LOCK_FILE).exists()}, run_dir)


def t11_oversized_workers(work: Path, env: dict) -> Row:
    """64 workers: refused before Ray starts on a local instance (naming the machine's CPUs), and
    by the cluster's resource check when joining one."""
    local_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    local = kd_ray(["train-student", *settings(work, "t11", "run.num_workers=64")], local_env)
    cluster = kd_ray(["train-student", *settings(work, "t11c", "run.num_workers=64")], env, inline=True)
    cpus = os.cpu_count()
    return Row("T11", "run.num_workers=64, local instance / cluster",
               {"local exit": local.code, "local s": local.seconds, "cluster exit": cluster.code,
                "error": local.short_error},
               {"local refused, exit 2": local.code == 2, f"names the machine's {cpus} CPUs":
                f"this machine has {cpus}" in local.error, "one line": local.err.count("kd-ray: error:") == 1,
                "no Ray started": "Started a local Ray instance" not in local.out + local.err,
                "nothing written": not (work / "t11").exists(),
                "cluster refused, exit 2": cluster.code == 2 and "the cluster has" in cluster.error})


def t12_non_ascii_name(work: Path, env: dict) -> Row:
    """A run name with spaces and non-ASCII letters trains; its folder keeps the name. Ray Train's
    path (run.runner train): Ray tags its metrics with the run name (stage.ray_names)."""
    name = "café run ä 1"
    out = kd_ray(["train-student", *settings(work, name, "optim.epochs=2", *ONE_WORKER, "run.runner=train")],
                 env, inline=True)
    run_dir = work / name
    return Row("T12", f"run.name '{name}'",
               {"exit": out.code, "wall s": out.seconds, "epochs logged": len(logged_epochs(run_dir))},
               {"run finishes": out.code == 0, "folder named as written": (run_dir / "summary.json").is_file(),
                "epochs 1-2 logged once": logged_epochs(run_dir) == [1, 2]}, run_dir)


def t13_bad_names_and_paths(work: Path, env: dict) -> list[Row]:
    """Refused before Ray: exit 2, one line, nothing written."""
    (work / "t13-file").write_text("a regular file")
    (work / "t13-empty.yaml").write_text("# nothing set\n")
    cases = [("storage under a regular file", [f"run.storage={work}/t13-file/runs"], [], "is a file"),
             ("run.name '..'", ["run.name='..'"], [], "run.name"),
             ("run.name of 300 bytes", [f"run.name={'é' * 150}"], [], "run.name"),
             ("empty config file", [], ["-c", work / "t13-empty.yaml"], "is empty")]
    rows = []
    for i, (what, extra, before, needle) in enumerate(cases):
        out = kd_ray(["train-student", *before, *settings(work, f"t13{'abcd'[i]}", *extra)], env, inline=True)
        rows.append(Row(f"T13{'ABCD'[i]}", what, {"exit": out.code, "s to error": out.seconds,
                                                  "error": out.short_error},
                        {"exit 2": out.code == 2, f"names '{needle}'": needle in out.error,
                         "one line": out.err.count("kd-ray: error:") == 1,
                         "nothing written": not (work / f"t13{'abcd'[i]}").exists()}))
    return rows


def t14_ctrl_c(work: Path, env: dict) -> Row:
    """Ctrl-C in epoch 2: stops after its checkpoint, exit 130; Ctrl-C twice in epoch 3: stops at
    once; the same command finishes; once more says finished and starts no worker."""
    # A grace long enough for the epoch's rest: the stop waits for the epoch's checkpoint (T15: not).
    argv = ["train-student", *settings(work, "t14", "optim.epochs=3", "run.stop_grace_s=600", *ONE_WORKER)]
    run_dir, faults = work / "t14", [work / f"t14-faults-{i}" for i in range(3)]
    hold = {"kind": "sleep", "rank": 0, "step": 0}
    first = _popen(argv, env, {"dir": str(faults[0]), "faults": [{**hold, "epoch": 2, "seconds": 4}]})
    _wait_for(lambda: len(read_history(run_dir)) >= 1, first)
    first.send_signal(signal.SIGINT)
    _, err1 = first.communicate(timeout=300)
    after_first = logged_epochs(run_dir)
    newest = checkpoints.latest(run_dir)
    kept = newest[1]["epoch"] if newest else 0
    second = _popen(argv, env, {"dir": str(faults[1]), "faults": [{**hold, "epoch": 3, "seconds": 120}]})
    _wait_for(lambda: any(e["event"] == "fault" for e in read_events(faults[1])), second)
    second.send_signal(signal.SIGINT)
    _wait_for(lambda: (run_dir / STOP_FILE).exists(), second)  # the first Ctrl-C was handled
    pressed = time.time()
    second.send_signal(signal.SIGINT)
    _, err2 = second.communicate(timeout=300)
    at_once = round(time.time() - pressed, 1)
    third = kd_ray(argv, env, inline=True)
    fourth = kd_ray(argv, env, faults[2], [], inline=True)  # its workers would log an attempt there
    workers_started = len(attempts(read_events(faults[2])))
    return Row("T14", "Ctrl-C in epoch 2; Ctrl-C twice in epoch 3; rerun; rerun when finished",
               {"exit after 1 Ctrl-C": first.returncode, "epochs logged": len(after_first),
                "exit after 2": second.returncode, "s 2nd Ctrl-C -> exit": at_once, "rerun exit": third.code,
                "finished rerun s": fourth.seconds, "workers started": workers_started},
               {"1st: exit 130": first.returncode == 130,
                "1st: says rerun to resume": "interrupted; rerun the same command to resume" in err1,
                "1st: epochs 1-2 logged and checkpointed": after_first == [1, 2] and kept == 2,
                "2nd: exit 130 within 30 s": second.returncode == 130 and at_once <= 30,
                "rerun finishes epoch 3": third.code == 0 and logged_epochs(run_dir) == [1, 2, 3],
                "finished rerun: exit 0, says finished": fourth.code == 0 and "already finished" in fourth.out,
                "finished rerun starts no worker": workers_started == 0}, run_dir)


def t15_sigterm_mid_epoch(work: Path, env: dict) -> Row:
    """SIGTERM (a scheduler's stop) while rank 0 holds at step 30 of epoch 2, with run.stop_grace_s
    0: every rank stops at the next check (every 25 steps across ranks) after its checkpoint,
    exit 143; the same command continues at that step and logs each epoch once."""
    argv = ["train-student", *settings(work, "t15", "optim.epochs=3", "data.synthetic_size=2048",
                                       "optim.batch_size=16", "run.stop_grace_s=0")]
    run_dir, faults = work / "t15", [work / f"t15-faults-{i}" for i in range(2)]
    hold = {"kind": "sleep", "rank": 0, "epoch": 2, "step": 30, "seconds": 5}
    first = _popen(argv, env, {"dir": str(faults[0]), "faults": [hold]})
    _wait_for(lambda: any(e["event"] == "fault" for e in read_events(faults[0])), first)
    first.send_signal(signal.SIGTERM)
    _, err1 = first.communicate(timeout=300)
    newest = checkpoints.latest(run_dir)
    kept = (newest[1]["epoch"], newest[1].get("step")) if newest else None
    after_first = logged_epochs(run_dir)
    second = kd_ray(argv, env, faults[1], [], inline=True)
    resumed = [(e["epoch"], e["step"]) for e in read_events(faults[1]) if e["event"] == "epoch_resume"]
    step = kept[1] if kept else None
    return Row("T15", "SIGTERM in epoch 2 (stop_grace_s 0); rerun",
               {"exit": first.returncode, "checkpoint (epochs, step)": kept, "rerun resumed at": resumed,
                "rerun exit": second.code},
               {"exit 143": first.returncode == 143,
                "says stopped by SIGTERM": "stopped by SIGTERM; rerun the same command to resume" in err1,
                "checkpoint inside epoch 2, after the signal": kept is not None and kept[0] == 1
                and step is not None and 30 < step <= 30 + 25,
                "only epoch 1 logged": after_first == [1],
                "rerun continues there on both ranks": resumed == [(2, step)] * 2
                and f"from epoch 2 step {step}" in second.out,
                "each epoch logged once": second.code == 0 and logged_epochs(run_dir) == [1, 2, 3]},
               run_dir)


def t19_full_disk_and_cut_short_cache(work: Path, env: dict) -> list[Row]:
    """A run folder on a 400 KB file system (a real tmpfs: the resnet18 student's first checkpoint
    does not fit) and a teacher cache whose row file lost its end: one line, exit 2, no retry,
    nothing half-written (no .tmp_checkpoint folder; no run folder for the cache)."""
    from kd_ray import cache as teacher_cache
    from kd_ray.config import load_config

    disk = work / "t19-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"T19 mounts a 400 KB tmpfs (needs root, as make test's deps do): {mounted.stderr}"
    try:
        full = kd_ray(["train-student", *settings(disk, "t19a", "model.student=resnet18")], env,
                      work / "t19a-faults", [], inline=True)
        left = sorted(p.name for p in (disk / "t19a").iterdir() if p.name.startswith(".tmp_checkpoint"))
        retries = len(read_failures(disk / "t19a"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    teacher = make_teacher(work / "t19-teacher.pt", [f"class{c}" for c in range(10)])
    cfg = load_config(overrides=[*SYNTHETIC, f"distill.teacher_path={teacher}", f"run.storage={work}"])
    cache = work / "t19-cache"
    teacher_cache.build(cfg, cache)
    part = sorted(cache.glob("part-*.npy"))[-1]
    part.write_bytes(part.read_bytes()[:-100])
    cut = kd_ray(["distill", *settings(work, "t19b", f"distill.teacher_path={teacher}",
                                       f"distill.teacher_cache={cache}")], env, work / "t19b-faults", [],
                 inline=True)
    return [Row("T19A", "run.storage on a full 400 KB tmpfs (resnet18 student)",
                {"exit": full.code, "s to error": full.seconds, "retries": retries, "error": full.short_error},
                {"exit 2": full.code == 2, "one line": full.err.count("kd-ray: error:") == 1,
                 "names the disk and its free space": "no space left on the disk of" in full.error
                 and "free)" in full.error,
                 "no retry": retries == 0 and len(attempts(read_events(work / "t19a-faults"))) == 1,
                 "no partial checkpoint left": left == []}),
            Row("T19B", "a teacher-cache row file cut short",
                {"exit": cut.code, "s to error": cut.seconds, "error": cut.short_error},
                {"exit 2": cut.code == 2, "one line": cut.err.count("kd-ray: error:") == 1,
                 "names the row file": part.name in cut.error,
                 "no worker started": attempts(read_events(work / "t19b-faults")) == [],
                 "nothing written": not (work / "t19b").exists()})]


SCENARIOS = [t1_worker_raises, t2_fails_every_attempt, t3_worker_killed, t4_driver_killed,
             t5_sweep_killed, t6_rank_stalls, t7_truncated_checkpoint, t8_bad_input,
             t10_two_drivers, t11_oversized_workers, t12_non_ascii_name, t13_bad_names_and_paths, t14_ctrl_c,
             t15_sigterm_mid_epoch, t19_full_disk_and_cut_short_cache]

