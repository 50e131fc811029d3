"""`kd-ray tune` end to end: a 4-trial ASHA sweep of the shipped configs/sweep.yaml (1-worker
trials, each in its Tune actor) on the session's Ray instance with best.yaml run as is, and a sweep
of 2-worker DDP trials (a TorchTrainer each) whose every trial fails, on a Ray instance of its own
(a killed and resumed sweep: test_chaos.py T5)."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

from kd_ray.cluster.tune import STARTS_FILE, TIMING_FILE
from kd_ray.config import load_config
from kd_ray.runs.files import read_history


def write_sweep(tmp_path, name, space, *, epochs=3, workers=2, **sweep) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"name": "synthetic", "synthetic_size": 256, "image_size": 16},
        "model": {"teacher": "simple_cnn", "student": "tiny_cnn"},
        "distill": {"loss": "kd"},
        "optim": {"epochs": epochs, "teacher_epochs": 2, "batch_size": 64, "lr": 0.05},
        "run": {"name": name, "storage": str(tmp_path / "results"), "num_workers": workers},
        "sweep": {"space": space, **sweep},
    }))
    return path


def kd_ray(env, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "kd_ray.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def kd_ray_here(*args) -> subprocess.CompletedProcess:
    """The same command in this process, on the session's Ray instance: a `kd-ray` subprocess
    costs ~5 CPU s of start-up on these 2 cores, where the command's own point is elsewhere."""
    from chaos_scenarios import kd_ray as run

    out = run(list(args), {}, inline=True)
    return subprocess.CompletedProcess(args, out.code, out.out, out.err)


def tb_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [event.step for event in acc.Scalars(tag)]


REPO = Path(__file__).resolve().parent.parent


def test_asha_sweep_leaves_table_best_yaml_heatmap_and_tensorboard(cli_env, tmp_path):
    """The sweep flow of docs/sweeps.md as a user runs it: the shipped configs/sweep.yaml (data.image_size
    and run.num_workers 1 left as they are), smaller for speed, then `kd-ray distill -c <sweep>/best.yaml`."""
    small = {"data.name": "synthetic", "data.synthetic_size": 256, "model.teacher": "simple_cnn",
             "optim.epochs": 3, "optim.teacher_epochs": 2, "optim.lr": 0.05,
             "run.name": "sweep4", "run.storage": tmp_path / "results", "sweep.grace_period": 1,
             "sweep.space": "{distill.temperature: [1, 4], distill.alpha: [0.5, 0.9]}"}
    sets = [arg for key, value in small.items() for arg in ("--set", f"{key}={value}")]
    done = kd_ray(cli_env, "tune", "-c", REPO / "configs" / "sweep.yaml", "--train-teacher", *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep_dir = tmp_path / "results" / "sweep4"
    assert "Trial status" in done.stdout  # Tune's live table

    # The teacher was trained once, and every trial read that one file.
    teacher = sweep_dir / "teacher" / "teacher.pt"
    assert list(sweep_dir.rglob("teacher.pt")) == [teacher]
    trials = sorted((sweep_dir / "trials").iterdir())
    assert len(trials) == 4
    for trial in trials:
        assert load_config(trial / "config.yaml").distill.teacher_path == str(teacher)
        epochs = [h["epoch"] for h in read_history(trial)]
        assert epochs == list(range(1, len(epochs) + 1)) and 1 <= len(epochs) <= 3
        # Tune's TensorBoard logger on the driver: one point per epoch, the step is the epoch.
        assert tb_steps(sweep_dir / "tune" / trial.name, "ray/tune/val/top1") == epochs
        # Where the trial's time went (bench_kd's breakdown): its driver's start, then the worker
        # loop's start and setup in the first epoch's row only, then the epochs.
        started = json.loads((trial / TIMING_FILE).read_text().splitlines()[0])["started"]
        rows = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
        assert started < rows[0]["perf/loop_started"] < rows[0]["time"]
        assert 0 < rows[0]["perf/setup_seconds"] < rows[0]["time"] - rows[0]["perf/loop_started"]
        assert not any("perf/setup_seconds" in row for row in rows[1:])

    lines = (sweep_dir / "summary.md").read_text().splitlines()
    assert lines[0].startswith("| trial | T | alpha | epochs | best_epoch | best val/top1 | final val/top1")
    assert len(lines) == 2 + 4
    finals = [float(line.split("|")[7]) for line in lines[2:]]
    assert finals == sorted(finals, reverse=True)
    assert (sweep_dir / "heatmap.png").read_bytes()[:4] == b"\x89PNG"

    # best.yaml is the best trial's config; `kd-ray distill -c best.yaml` takes it as is.
    best_trial = lines[2].split("|")[1].strip()
    best = load_config(sweep_dir / "best.yaml")
    trial_cfg = load_config(sweep_dir / "trials" / best_trial / "config.yaml")
    assert (best.distill.temperature, best.distill.alpha) == (trial_cfg.distill.temperature,
                                                               trial_cfg.distill.alpha)
    rerun = kd_ray_here("distill", "-c", sweep_dir / "best.yaml")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "sweep4-best" / "summary.json").read_text())
    if lines[2].rstrip().endswith("| completed |"):  # same seed, config and cached logits
        assert abs(100 * summary["final"]["val/top1"] - finals[0]) <= 0.5


def test_sweep_whose_every_trial_fails_exits_non_zero_with_the_first_error(cli_env, tmp_path):
    """Run on a Ray instance of its own, beside the session's: two instances on one machine. Each
    trial is a 2-worker TorchTrainer that reports epoch 1 to Tune, then stops on a NaN loss in
    epoch 2 on both ranks; Tune does not retry it (no retry fixes a NaN)."""
    config = write_sweep(tmp_path, "allfail", {"distill.temperature": [1, 4]}, epochs=2, workers=2,
                         scheduler="none")
    env = {k: v for k, v in cli_env.items() if k != "RAY_ADDRESS"}
    done = kd_ray(env, "tune", "-c", config, "--set", "distill.loss=tests.plugins:nan_in_second_epoch")
    assert "Started a local Ray instance" in done.stdout + done.stderr
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("kd-ray: error: every trial of the sweep failed; the first error: ")
    assert "not finite" in error or "nan" in error
    assert "error:" in (tmp_path / "results" / "allfail" / "summary.md").read_text()
    trials = sorted((tmp_path / "results" / "allfail" / "trials").iterdir())
    assert len(trials) == 2
    for trial in trials:
        assert [h["epoch"] for h in read_history(trial)] == [1]
        assert len((trial / STARTS_FILE).read_text().splitlines()) == 1  # started once: no retry
