"""What an N-trial `kd-ray tune` sweep costs next to N single distillation runs.

Prints, measured in one run on one Ray instance (this machine is shared and noisy):
  wall ratio  = sweep wall time / (N x wall time of one `kd-ray distill` run of the same config)
  epoch ratio = trial-epochs the sweep ran (ASHA stops some early) / (N x the epoch budget)

    python scripts/bench_sweep.py [--trials 4] [--epochs 4] [--workers 1] [--out benchmarks/sweep.md]

It writes its figures to --out and appends them to history.csv beside it.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

from kd_ray.config import Config  # noqa: E402
from kd_ray.cluster.session import ensure_ray  # noqa: E402
from kd_ray.cluster.stage import run_stage  # noqa: E402
from kd_ray.cluster.tune import driver_cpus, run_sweep, trials_that_fit  # noqa: E402
from kd_ray.deploy.bench import append_history  # noqa: E402
from kd_ray.runs.files import read_history  # noqa: E402
from kd_ray.runs.sweep_report import TRIALS_DIR  # noqa: E402

TEMPERATURES = [1, 2, 4, 8, 16, 3, 6, 12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="DDP workers per run / trial")
    parser.add_argument("--images", type=int, default=2048, help="synthetic training images")
    parser.add_argument("--out", default="benchmarks/sweep.md", help="markdown file for the figures")
    args = parser.parse_args()
    storage = Path(tempfile.mkdtemp(prefix="kd_ray_bench_sweep_"))
    cfg = Config.from_dict({
        "data": {"name": "synthetic", "synthetic_size": args.images, "image_size": 32},
        "model": {"teacher": "simple_cnn", "student": "tiny_cnn"},
        "distill": {"loss": "kd", "alpha": 0.9},
        "optim": {"epochs": args.epochs, "teacher_epochs": 1, "batch_size": 64, "lr": 0.02},
        "run": {"storage": str(storage), "num_workers": args.workers},
        "sweep": {"space": {"distill.temperature": TEMPERATURES[:args.trials]},
                  "scheduler": "asha", "grace_period": 1, "reduction_factor": 2},
    })
    try:
        ensure_ray(cfg, extra_cpus=driver_cpus(cfg))
        teacher = run_stage(cfg, "teacher", name="teacher")
        cfg = cfg.replace(distill={"teacher_path": teacher.summary["teacher_file"]})

        started = time.perf_counter()
        run_stage(cfg, "distill", name="single")
        single = time.perf_counter() - started

        started = time.perf_counter()
        sweep_dir, table = run_sweep(cfg.replace(run={"name": "sweep"}))
        sweep = time.perf_counter() - started
        epochs = sum(len(read_history(d)) for d in (sweep_dir / TRIALS_DIR).iterdir())
        concurrent = trials_that_fit(cfg)
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    n, budget = args.trials, args.epochs
    wall, epoch_ratio = sweep / (n * single), epochs / (n * budget)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    lines = [f"machine: {machine}",
             f"setup: {n} trials (T sweep, ASHA grace 1, factor 2), {budget} epochs, "
             f"{args.workers} worker(s) per run, {concurrent} trial(s) at once, "
             f"{args.images} synthetic 32 px images, tiny_cnn student, simple_cnn teacher",
             f"one distill run: {single:.1f} s",
             f"sweep of {n}: {sweep:.1f} s",
             f"wall ratio sweep / ({n} x one run) = {wall:.2f}",
             f"epoch ratio trial-epochs / ({n} x {budget} epochs) = {epoch_ratio:.2f} ({epochs} of {n * budget})"]
    print(f"\n{table}\n\n" + "\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# bench_sweep ({time.strftime('%Y-%m-%d %H:%M')}, `python scripts/bench_sweep.py`)\n\n"
                   + "\n".join(f"- {line}" for line in lines) + f"\n\n{table}\n")
    history = append_history(out.parent / "history.csv", machine,
                             [(f"sweep of {n} / ({n} x one run), wall time", f"{wall:.2f}", ""),
                              (f"trial-epochs / ({n} x {budget} epochs)", f"{epoch_ratio:.2f}", "")])
    print(f"wrote {out}, appended to {history}")


if __name__ == "__main__":
    main()
