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
from kd_ray.errors import KdRayError, RunFailedError, RunsFailedError, one_line
from kd_ray.log import get
from kd_ray.runs.methods_table import write_methods_table
from kd_ray.runs.report import find_runs, write_report
from kd_ray.runs.stages import (assistant_config, check_pipeline, describe_setup, distill_run_name,
                                method_config, method_label)
from kd_ray.runs.summary import (clear_failure, export_assistant, failed_runs, record_failure,
                                update_summary)
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
    attempt = Attempts(root)
    for seed in cfg.run.seeds:
        seeded = top.replace(run={"seed": seed})
        attempt(seeded, "student", f"student-seed{seed}", "student, labels only")
        if not distill:
            continue
        for method in methods:
            attempt(method_config(seeded, method), "distill", distill_run_name(cfg, method, seed),
                    method_label(cfg, method, compare))
        if chain:  # the student distilled from the last assistant
            via = seeded.replace(distill={"teacher_path": str(export_assistant(chain[-1])),
                                          "teacher_weights": None,
                                          "teacher_cache": chain_cache(cfg, chain[-1])})
            attempt(via, "distill", f"distill-ta-seed{seed}",
                    f"student, distilled via {' -> '.join(cfg.model.assistants)}")
    dirs += attempt.done
    runs = find_runs(dirs)
    failed = failed_runs(attempt.failed)
    table = write_report(root, runs, failed=failed)
    if compare:
        methods_table = write_methods_table(root, runs, top, failed)
        table = f"{table}\n\nMethods ({root}/methods.md):\n{methods_table}"
    log_comparison(cfg, root, ["comparison.md", "comparison.csv", "methods.md", "methods.csv",
                               "accuracy.png", "tradeoff.png"])
    minutes = (time.perf_counter() - started) / 60
    if attempt.failed:
        names = "; ".join(f"{d.name}: {one_line(e)}" for d, e in attempt.failed.items())
        raise RunsFailedError(f"{len(attempt.failed)} run(s) failed ({names}); every other run "
                              f"finished and the table marks them; rerun the same command to retry only "
                              f"the failed ones", root=root, table=table)
    log.info(f"pipeline finished in {minutes:.1f} min; comparison in {root}/comparison.md, "
             f"plots in {root}/accuracy.png and {root}/tradeoff.png (accuracy against CPU latency), "
             f"TensorBoard: tensorboard --logdir {root}")
    return root, table


class Attempts:
    """Runs of a comparison, each on its own: one that fails is recorded (failed.json in its
    folder, a marked row in the tables) and the others still train. A rerun retries only the
    failed ones: finished runs are found finished and not trained again."""

    def __init__(self, root: Path):
        self.root, self.done, self.failed = root, [], {}

    def __call__(self, cfg: Config, stage: str, name: str, label: str) -> None:
        run_dir = self.root / name
        clear_failure(run_dir)
        try:
            result = run_stage(cfg, stage, storage=str(self.root), name=name)
        except (KdRayError, RunFailedError) as exc:
            log.error(f"{name} failed: {one_line(exc)}; the other runs go on")
            record_failure(run_dir, stage=stage, label=label, seed=cfg.run.seed, error=one_line(exc))
            self.failed[run_dir] = exc
            return
        update_summary(result.run_dir, label=label)
        self.done.append(result.run_dir)


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
