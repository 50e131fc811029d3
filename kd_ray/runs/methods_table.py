"""The methods table of ``kd-ray compare``: per distillation method (and teacher-assistant chain),
mean ± std top-1 over seeds, top-1 agreement with the teacher on the validation split (measured
here, plain PyTorch), training images/s, and whether the teacher cache served it."""
from __future__ import annotations

import statistics

import torch
from torch.utils.data import DataLoader

from kd_ray.config import Config, teacher_files
from kd_ray.data import build_data
from kd_ray.engine import checkpoints
from kd_ray.log import get
from kd_ray.models import build_model, load_teachers
from kd_ray.runs.report import final_top1, test_top1, write_tables
from kd_ray.runs.summary import update_summary
from kd_ray.storage import location

log = get(__name__)


@torch.no_grad()
def teacher_agreement(run_dir, teacher_cfg: Config, batch_size: int = 256) -> float:
    """Share of validation images on which the run's student and the teacher (``teacher_cfg``'s
    ``distill.teacher_path``, an ensemble too) predict the same class. Kept in summary.json."""
    run_dir = location(run_dir)
    _, _, state = checkpoints.latest(run_dir, with_state=True)
    cfg = Config.from_dict(state["config"])
    bundle = build_data(cfg.data, "distill", cfg.run.seed)
    student = build_model(state["arch"], len(state["classes"]))
    student.load_state_dict(state["model"])
    student.eval()
    teacher = load_teachers(teacher_files(teacher_cfg.distill), teacher_cfg.distill.teacher_weights,
                            bundle.image_size, bundle.norm)
    same = total = 0
    for images, _labels in DataLoader(bundle.val, batch_size=batch_size):
        same += int((student(images).argmax(1) == teacher(images).argmax(1)).sum())
        total += len(images)
    agreement = same / max(total, 1)
    update_summary(run_dir, teacher_agreement=agreement)
    return agreement


def method_rows(runs: list[dict], teacher_cfg: Config, failed=()) -> list[dict]:
    """One row per label of distilled runs (the compare command labels them by method);
    ``failed``: failure records of distill runs (counted per label; a row of their own when none
    of a label's runs finished)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        summary = run["summary"]
        if summary["stage"] == "distill" and summary.get("role") != "assistant":
            groups.setdefault(summary.get("label") or summary.get("loss", "?"), []).append(run)
    rows = []
    for label, members in groups.items():
        accs = [100 * final_top1(r) for r in members]
        agree = []
        for run in members:
            value = run["summary"].get("teacher_agreement")
            if value is None:
                log.info(f"agreement with the teacher: {run['dir'].name}")
                value = teacher_agreement(run["dir"], teacher_cfg)
            agree.append(100 * value)
        speeds = [r["summary"].get("images_per_s") or 0.0 for r in members]
        cached = {str(r["summary"].get("teacher_cache", "off")) != "off" for r in members}
        tests = [100 * t for t in map(test_top1, members) if t is not None]
        lost = [f for f in failed if f["label"] == label]
        rows.append({
            "method": label, "arch": members[0]["summary"]["arch"], "runs": len(members),
            "top1_mean": statistics.fmean(accs), "top1_std": _std(accs),
            "test_mean": statistics.fmean(tests) if len(tests) == len(members) else None,
            "test_std": _std(tests) if len(tests) == len(members) else None,
            "agreement_mean": statistics.fmean(agree), "agreement_std": _std(agree),
            "images_per_s": statistics.median(speeds),
            "cache": "yes" if cached == {True} else "no" if cached == {False} else "partly",
            "failed": len(lost), "error": lost[0]["error"] if lost else "",
        })
    for label in dict.fromkeys(f["label"] for f in failed if f["stage"] == "distill"):
        if label not in groups:
            lost = [f for f in failed if f["label"] == label]
            rows.append({"method": label, "arch": "-", "runs": 0, "top1_mean": None, "top1_std": None,
                         "test_mean": None, "test_std": None, "agreement_mean": None,
                         "agreement_std": None, "images_per_s": None, "cache": "-",
                         "failed": len(lost), "error": lost[0]["error"]})
    return rows


def _std(values: list) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(mean, std) -> str:
    return "-" if mean is None else f"{mean:.2f} ± {std:.2f}"


def methods_markdown(rows: list[dict]) -> str:
    test = any(r.get("test_mean") is not None for r in rows)
    failed = any(r.get("failed") for r in rows)
    lines = ["| method | student | runs | val top-1 % (mean ± std) |" + (" test top-1 % |" if test else "")
             + " agreement with teacher % | train images/s | teacher cache |" + (" failed |" if failed else ""),
             "|---|---|---:|---:|" + ("---:|" if test else "") + "---:|---:|---|" + ("---|" if failed else "")]
    for r in rows:
        speed = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.0f}"
        lines.append(f"| {r['method']} | {r['arch']} | {r['runs']} | {_cell(r['top1_mean'], r['top1_std'])} |"
                     + (f" {_cell(r['test_mean'], r['test_std'])} |" if test else "")
                     + f" {_cell(r['agreement_mean'], r['agreement_std'])} | {speed} | {r['cache']} |"
                     + ((f" {r['failed']}: {r['error']} |" if r["failed"] else " |") if failed else ""))
    return "\n".join(lines)


def write_methods_table(out_dir, runs: list[dict], teacher_cfg: Config, failed=()) -> str:
    """``methods.md`` and ``methods.csv`` in ``out_dir``; returns the markdown table."""
    rows = method_rows(runs, teacher_cfg, failed)
    table = methods_markdown(rows)
    if rows:
        write_tables(location(out_dir) / "methods", rows, table)
    return table
