"""Teacher, then label-only student and distilled student per seed, then the comparison.

``methods`` (``kd-ray compare``): every method distils per seed from the same teacher and cache,
and a methods table follows. ``model.assistants``: a teacher-assistant chain (Mirzadeh et al.
2020), teacher -> assistant(s) -> student, beside the direct teacher -> student runs.
"""
from __future__ import annotations

import time
from pathlib import Path

from kd_ray.cluster.stage import run_stage
from kd_ray.config import Config
from kd_ray.log import get
from kd_ray.runs.methods_table import write_methods_table
from kd_ray.runs.report import find_runs, write_report
from kd_ray.runs.stages import (assistant_config, check_pipeline, describe_setup, distill_run_name,
                                method_config, method_label)
from kd_ray.runs.summary import export_assistant, update_summary
from kd_ray.runs.tracking import log_comparison
from kd_ray.storage import location, storage_root

log = get(__name__)


def run_pipeline(cfg: Config, train_teacher: bool = True, distill: bool = True,
                 checked: bool = False, methods: list | None = None) -> tuple[Path, str]:
    """Run the stages under <storage>/<run.name>/ and write the comparison there (``checked``:
    the caller ran ``runs.stages.check_pipeline`` already). With ``methods`` (compare), also
    ``methods.md``/``methods.csv``."""
    root = location(storage_root(cfg.run.storage)) / cfg.run.name
    started = time.perf_counter()
    log.info(f"pipeline {cfg.run.name}: {describe_setup(cfg)}")
    teacher_path = cfg.distill.teacher_path
    train_teacher = train_teacher or not teacher_path
    compare = methods is not None
    methods = methods or [cfg.distill.loss]
    if not checked:
        check_pipeline(cfg, train_teacher, distill, methods)
    if train_teacher:
        teacher = run_stage(cfg, "teacher", storage=str(root), name="teacher")
        teacher_path = teacher.summary["teacher_file"]
    weights = None if train_teacher else cfg.distill.teacher_weights
    top = cfg.replace(distill={"teacher_path": teacher_path, "teacher_weights": weights})
    dirs = [root / "teacher"] if (root / "teacher" / "summary.json").exists() else []
    chain = run_assistants(top, root) if distill else []
    dirs += chain
    for seed in cfg.run.seeds:
        seeded = top.replace(run={"seed": seed})
        dirs.append(run_stage(seeded, "student", storage=str(root), name=f"student-seed{seed}").run_dir)
        if not distill:
            continue
        for method in methods:
            name = distill_run_name(cfg, method, seed)
            run_dir = run_stage(method_config(seeded, method), "distill", storage=str(root), name=name).run_dir
            update_summary(run_dir, label=method_label(cfg, method, compare))
            dirs.append(run_dir)
        if chain:  # the student distilled from the last assistant
            via = seeded.replace(distill={"teacher_path": str(export_assistant(chain[-1])),
                                          "teacher_weights": None,
                                          "teacher_cache": chain_cache(cfg, chain[-1])})
            run_dir = run_stage(via, "distill", storage=str(root), name=f"distill-ta-seed{seed}").run_dir
            update_summary(run_dir, label=f"student, distilled via {' -> '.join(cfg.model.assistants)}")
            dirs.append(run_dir)
    runs = find_runs(dirs)
    table = write_report(root, runs)
    if compare:
        methods_table = write_methods_table(root, runs, top)
        table = f"{table}\n\nMethods ({root}/methods.md):\n{methods_table}"
    log_comparison(cfg, root, ["comparison.md", "comparison.csv", "methods.md", "methods.csv",
                               "accuracy.png", "tradeoff.png"])
    minutes = (time.perf_counter() - started) / 60
    log.info(f"pipeline finished in {minutes:.1f} min; comparison in {root}/comparison.md, "
             f"plots in {root}/accuracy.png and {root}/tradeoff.png (accuracy against CPU latency), "
             f"TensorBoard: tensorboard --logdir {root}")
    return root, table


def run_assistants(cfg: Config, root: Path) -> list[Path]:
    """Each assistant of ``model.assistants`` distilled from the one before (the first from the
    teacher), once (seed ``run.seeds[0]``); each a resumable run folder that exports teacher.pt."""
    dirs, teacher_path, cache = [], cfg.distill.teacher_path, cfg.distill.teacher_cache
    for i, arch in enumerate(cfg.model.assistants):
        acfg = assistant_config(cfg, arch, teacher_path, cache, cfg.run.seeds[0])
        run_dir = run_stage(acfg, "distill", storage=str(root), name=f"assistant{i + 1}-{arch}").run_dir
        source = "the teacher" if i == 0 else cfg.model.assistants[i - 1]
        update_summary(run_dir, role="assistant", label=f"assistant {i + 1}, distilled from {source}")
        teacher_path, cache = str(export_assistant(run_dir)), chain_cache(cfg, run_dir)
        dirs.append(run_dir)
    return dirs


def chain_cache(cfg: Config, assistant_dir: Path) -> str:
    """An assistant's logits get a cache of their own (inside its run folder), so the teacher's
    cache is not rebuilt back and forth."""
    setting = cfg.distill.teacher_cache
    return str(Path(assistant_dir) / "teacher_cache") if setting == "auto" else "off"
