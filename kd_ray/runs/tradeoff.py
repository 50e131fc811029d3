"""What distillation buys: size, MACs, CPU latency and agreement with the teacher per comparison
row, and ``tradeoff.png`` (validation accuracy against CPU latency).

Runs without a usable checkpoint (e.g. hand-made summaries) keep empty cells: the table is still
written. Latency is PyTorch eager at batch 1 on one CPU thread (median of a short timing),
measured once per run and kept in its deploy.json, so that `kd-ray report` gives the same table.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
from pathlib import Path

from kd_ray.deploy.bench import count_macs, timed, torch_runner, weights_bytes
from kd_ray.deploy.evaluate import collect_logits, split_dataset
from kd_ray.deploy.loading import open_model
from kd_ray.deploy.model import has_teacher
from kd_ray.errors import KdRayError
from kd_ray.storage import is_uri, save_figure

log = logging.getLogger(__name__)
COLUMNS = ("size_mb", "macs", "cpu_ms", "agreement")
DEPLOY_FILE = "deploy.json"


def _latency_ms(model, seconds: float) -> float:
    """One thread: on a busy machine two threads at batch 1 waited ~50 ms per call for each
    other (measured here: tiny_cnn 0.15 ms with one thread, 56 ms with two)."""
    import numpy as np
    import torch  # local: heavy

    size = model.meta["image_size"]
    one = np.zeros((1, 3, size, size), dtype=np.float32)
    call = torch_runner(model.module, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return 1e3 * statistics.median(timed(lambda: call(one), seconds, min_calls=20, warmup=5))
    finally:
        torch.set_num_threads(threads)


def _agreement(model, teachers: dict) -> float | None:
    """Share of validation images where the run's student and its teacher pick the same class."""
    cfg = model.extra["config"]
    if model.extra["stage"] == "teacher" or not has_teacher(cfg):
        return None
    dataset, _ = split_dataset(cfg, "val", model.meta["image_size"])
    key = (str(cfg.distill.teacher_path), len(dataset))
    if key not in teachers:
        teacher = open_model(model.meta["run"], "teacher")
        teachers[key] = collect_logits([teacher], dataset)[1][0].argmax(axis=1)
    student = collect_logits([model], dataset)[1][0].argmax(axis=1)
    return float((student == teachers[key]).mean())


def run_numbers(run_dir, teachers: dict, seconds: float = 0.5, latencies: dict | None = None) -> dict:
    """Size, MACs, CPU latency and agreement of one run, measured once: kept in deploy.json
    beside the run (remade when the run has a newer checkpoint), so a report is reproducible.
    ``latencies``: (arch, image size) -> ms already measured in this report, so that runs of one
    architecture show one latency rather than the machine's noise between two timings."""
    path = Path(run_dir) / DEPLOY_FILE
    model = open_model(run_dir)
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("checkpoint") == model.meta["checkpoint"]:
            return kept
    agreement = _agreement(model, teachers)
    numbers = {"checkpoint": model.meta["checkpoint"], "arch": model.meta["arch"],
               "image_size": model.meta["image_size"], "size_mb": weights_bytes(model.module) / 2**20,
               "macs": count_macs(model.module, model.meta["image_size"]),
               "cpu_ms": _cached_latency(model, seconds, latencies if latencies is not None else {}),
               "agreement": None if agreement is None else 100 * agreement}
    tmp = path.with_name(f".tmp_{os.getpid()}_{DEPLOY_FILE}")
    tmp.write_text(json.dumps(numbers, indent=2))
    os.replace(tmp, path)
    return numbers


def _kept_latencies(runs: list[dict]) -> dict:
    """(arch, image size) -> ms from the deploy.json files already written."""
    kept = {}
    for run in runs:
        try:
            numbers = json.loads((Path(run["dir"]) / DEPLOY_FILE).read_text())
            kept.setdefault((numbers["arch"], numbers["image_size"]), numbers["cpu_ms"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return kept


def _cached_latency(model, seconds: float, latencies: dict) -> float:
    key = (model.meta["arch"], model.meta["image_size"])
    if key not in latencies:
        latencies[key] = _latency_ms(model, seconds)
    return latencies[key]


def add_deploy_columns(rows: list[dict], runs: list[dict], seconds: float = 0.5) -> None:
    """Fill COLUMNS of each comparison row (same grouping as report.comparison_rows) in place:
    medians over the row's runs, the mean for agreement."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["summary"]["stage"], run["summary"]["arch"]), []).append(run)
    teachers: dict = {}
    latencies = _kept_latencies(runs)
    for row, key in zip(rows, _row_keys(rows)):
        row.update(dict.fromkeys(COLUMNS))
        measured = []
        for run in groups.get(key, []):
            if is_uri(run["dir"]):  # measured on a local copy only: `kd-ray bench` does that
                log.info("no deploy numbers for %s: the run is in object storage", run["dir"])
                continue
            try:
                measured.append(run_numbers(run["dir"], teachers, seconds, latencies))
            except KdRayError as exc:  # a hand-made or moved run: leave the cells empty
                log.info("no deploy numbers for %s: %s", run["dir"], exc)
        for column in COLUMNS:
            values = [m[column] for m in measured if m.get(column) is not None]
            if values:
                average = statistics.fmean if column == "agreement" else statistics.median
                row[column] = average(values)


def _row_keys(rows: list[dict]) -> list[tuple]:
    stages = {"teacher": "teacher", "student, labels only": "student", "student, distilled": "distill"}
    return [(stages.get(r["model"], r["model"]), r["arch"]) for r in rows]


def cells(row: dict) -> str:
    """The extra markdown cells of one row ('-' where unknown)."""
    size = f"{row['size_mb']:.3f}" if row.get("size_mb") is not None else "-"
    macs = f"{row['macs'] / 1e6:.2f}M" if row.get("macs") is not None else "-"
    ms = f"{row['cpu_ms']:.3f}" if row.get("cpu_ms") is not None else "-"
    agree = f"{row['agreement']:.2f}" if row.get("agreement") is not None else "-"
    return f" {size} | {macs} | {ms} | {agree} |"


def plot_tradeoff(rows: list[dict], path) -> bool:
    """Accuracy (mean, min-max bar) against CPU latency per row; False when nothing to plot."""
    points = [r for r in rows if r.get("cpu_ms")]
    if not points:
        return False
    import matplotlib  # local: slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(points):
        err = [[r["top1_mean"] - r["top1_min"]], [r["top1_max"] - r["top1_mean"]]]
        ax.errorbar([r["cpu_ms"]], [r["top1_mean"]], yerr=err, fmt="o", ms=8, capsize=4,
                    color=f"C{i}", label=f"{r['model']} ({r['arch']}, {r['params']:,} params)")
    ax.set_xscale("log")
    ax.set_xlabel("CPU latency, batch 1, 1 thread, PyTorch eager (ms, log scale)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Accuracy against latency: up and to the left is better")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True
