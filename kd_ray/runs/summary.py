"""A finished stage's summary.json, and the teacher file a teacher stage exports."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from kd_ray.config import Config
from kd_ray.engine import checkpoints
from kd_ray.errors import RunFailedError
from kd_ray.methods import build_method
from kd_ray.models import build_model, count_params, export_teacher
from kd_ray.runs.files import SUMMARY_FILE, read_history
from kd_ray.storage import location

TEACHER_FILE = "teacher.pt"


def summarize(cfg: Config, stage: str, run_dir: Path, last_metrics: dict | None = None) -> dict:
    """Export the teacher (teacher stage) and write summary.json beside the run.

    ``last_metrics``: the last report, used when metrics.jsonl has no line (nothing left to train).
    """
    found = checkpoints.latest(run_dir, with_state=True)
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
        "final": {k: v for k, v in (history[-1] if history else last_metrics or {}).items()
                  if isinstance(v, (int, float)) and k != "time"},
        "best_top1": max((h.get("val/top1", 0.0) for h in history), default=None),
        "images_per_s": statistics.median(speeds) if speeds else None,
        "checkpoint": str(folder),
    }
    if stage == "distill":
        summary.update(loss=cfg.distill.loss, temperature=build_method(cfg.distill).temperature,
                       alpha=cfg.distill.alpha, teacher=cfg.distill.teacher_path,
                       teacher_weights=cfg.distill.teacher_weights,
                       teacher_cache=cfg.distill.teacher_cache)  # the folder read, or "off"
    if stage == "teacher":
        summary["teacher_file"] = str(export_run_teacher(run_dir, model, state, summary))
    (location(run_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def export_run_teacher(run_dir: Path, model, state: dict, summary: dict) -> Path:
    """``<run>/teacher.pt`` from a finished run (a teacher, or an assistant of a chain)."""
    path = location(run_dir) / TEACHER_FILE
    export_teacher(path, model, state["arch"], state["classes"], state["image_size"],
                   extra={"run": str(run_dir), "val_top1": summary["final"].get("val/top1")},
                   norm=state.get("norm"))
    return path


def export_assistant(run_dir) -> Path:
    """The teacher file of a distilled run (a teacher-assistant chain's link), made once."""
    run_dir = location(run_dir)
    path = run_dir / TEACHER_FILE
    if not path.is_file():
        _, _, state = checkpoints.latest(run_dir, with_state=True)
        model = build_model(state["arch"], len(state["classes"]))
        model.load_state_dict(state["model"])
        export_run_teacher(run_dir, model, state, read_summary(run_dir))
    return path


def read_summary(run_dir) -> dict:
    return json.loads((location(run_dir) / SUMMARY_FILE).read_text())


def update_summary(run_dir, **fields) -> dict:
    """Add fields to a finished run's summary.json (a row label, a measured agreement)."""
    summary = {**read_summary(run_dir), **fields}
    (location(run_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


FAILED_FILE = "failed.json"  # a run of a comparison that failed: its row says why


def record_failure(run_dir, **fields) -> None:
    """Write ``failed.json`` (stage, label, seed, error) into a failed run's folder."""
    folder = location(run_dir)
    if isinstance(folder, Path):
        folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILED_FILE).write_text(json.dumps({"run": folder.name, **fields}, indent=2))


def clear_failure(run_dir) -> None:
    (location(run_dir) / FAILED_FILE).unlink(missing_ok=True)


def failed_runs(run_dirs) -> list[dict]:
    """The failure records of ``run_dirs`` (those that have one)."""
    found = []
    for folder in map(location, run_dirs):
        path = folder / FAILED_FILE
        if path.is_file():
            found.append(json.loads(path.read_text()))
    return found
