"""Teacher, then label-only student and distilled student per seed, then the comparison."""
from __future__ import annotations

import time
from pathlib import Path

from kd_ray.cluster.stage import run_stage
from kd_ray.config import Config
from kd_ray.log import get
from kd_ray.runs.report import find_runs, write_report
from kd_ray.runs.stages import check_pipeline, describe_setup
from kd_ray.storage import location, storage_root

log = get(__name__)


def run_pipeline(cfg: Config, train_teacher: bool = True, distill: bool = True,
                 checked: bool = False) -> tuple[Path, str]:
    """Run the stages under <storage>/<run.name>/ and write the comparison there (``checked``:
    the caller ran ``runs.stages.check_pipeline`` already)."""
    root = location(storage_root(cfg.run.storage)) / cfg.run.name
    started = time.perf_counter()
    log.info(f"pipeline {cfg.run.name}: {describe_setup(cfg)}")
    teacher_path = cfg.distill.teacher_path
    train_teacher = train_teacher or not teacher_path
    if not checked:
        check_pipeline(cfg, train_teacher, distill)
    if train_teacher:
        teacher = run_stage(cfg, "teacher", storage=str(root), name="teacher")
        teacher_path = teacher.summary["teacher_file"]
    dirs = [root / "teacher"] if (root / "teacher" / "summary.json").exists() else []
    for seed in cfg.run.seeds:
        seeded = cfg.replace(run={"seed": seed}, distill={"teacher_path": teacher_path})
        dirs.append(run_stage(seeded, "student", storage=str(root), name=f"student-seed{seed}").run_dir)
        if distill:
            dirs.append(run_stage(seeded, "distill", storage=str(root), name=f"distill-seed{seed}").run_dir)
    table = write_report(root, find_runs(dirs))
    minutes = (time.perf_counter() - started) / 60
    log.info(f"pipeline finished in {minutes:.1f} min; comparison in {root}/comparison.md, "
             f"plot in {root}/accuracy.png, TensorBoard: tensorboard --logdir {root}")
    return root, table
