"""run.runner auto (one Ray task) against train (a TorchTrainer): the same 1-worker student runs,
3 seeds, on the MNIST subset and scikit-learn's digits; prints val top-1 and wall time per run.

    python scripts/make_digits_tree.py data/digits64
    python scripts/runner_parity.py [data/digits64]
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before Ray is imported


def main() -> None:
    import ray

    from kd_ray import log
    from kd_ray.cluster.stage import run_stage
    from kd_ray.config import load_config

    log.configure()
    ray.init(num_cpus=2, include_dashboard=False)
    storage = Path(tempfile.mkdtemp(prefix="kd_ray_runner_"))
    digits = Path(sys.argv[1] if len(sys.argv) > 1 else "data/digits64").absolute()
    data_sets = {"mnist5k": ["data.name=mnist5k", "model.student=tiny_cnn"],
                 "digits": ["data.name=imagefolder", f"data.root={digits}", "data.image_size=16",
                            "model.student=simple_cnn"]}
    rows = []
    for data, sets in data_sets.items():
        for runner in ("auto", "train"):
            tops, secs = [], []
            for seed in (0, 1, 2):
                cfg = load_config(overrides=[*sets, "optim.epochs=3", "optim.lr=0.02", "optim.batch_size=64",
                                             "run.num_workers=1", f"run.seed={seed}", f"run.runner={runner}",
                                             f"run.storage={storage}", f"run.name={data}-{runner}-{seed}"])
                t = time.time()
                result = run_stage(cfg, "student")
                secs.append(time.time() - t)
                tops.append(100 * result.summary["final"]["val/top1"])
            rows.append((data, runner, tops, secs))
    print("| data | run.runner | val top-1 per seed (0, 1, 2) | mean ± std | wall s per run |")
    print("|---|---|---|---:|---|")
    for data, runner, tops, secs in rows:
        print(f"| {data} | {runner} | {', '.join(f'{t:.2f}' for t in tops)} | {statistics.mean(tops):.2f} ± "
              f"{statistics.stdev(tops):.2f} | {', '.join(f'{s:.1f}' for s in secs)} |")


if __name__ == "__main__":
    main()
