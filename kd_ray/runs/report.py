"""Compare finished runs: a markdown/CSV table and a PNG of validation accuracy per epoch."""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from kd_ray.errors import KdRayError
from kd_ray.log import get
from kd_ray.runs.files import METRICS_FILE, read_history
from kd_ray.runs.tradeoff import add_deploy_columns, cells, plot_tradeoff
from kd_ray.storage import location, save_figure

log = get(__name__)

ROLE_NAMES = {"teacher": "teacher", "student": "student, labels only", "distill": "student, distilled"}
ROLE_ORDER = ("teacher", "student", "distill")


def is_unfinished(folder: Path) -> bool:
    """A run folder that trained (metrics or checkpoints) but has no summary.json yet."""
    return not (folder / "summary.json").is_file() and (
        (folder / METRICS_FILE).is_file() or any(folder.glob("checkpoint_*")))


def _unfinished(folder: Path) -> str:
    epochs = len(read_history(folder))
    return f"{folder} is unfinished ({epochs} epoch(s) logged, no summary.json)"


def load_run(run_dir) -> dict:
    run_dir = location(run_dir)
    path = run_dir / "summary.json"
    if is_unfinished(run_dir):
        raise KdRayError(f"run {_unfinished(run_dir)}: rerun the command that started it to finish it "
                         "(it resumes), then report")
    if not path.is_file():
        raise KdRayError(f"{run_dir} has no summary.json: pass the folder of a finished kd_ray run")
    summary = _parsed(path, lambda: json.loads(path.read_text()), REWRITE_SUMMARY)
    if not isinstance(summary, dict):
        raise KdRayError(f"{path} holds no summary (a JSON {type(summary).__name__}): {REWRITE_SUMMARY}")
    history = _parsed(run_dir / METRICS_FILE, lambda: read_history(run_dir), REWRITE_METRICS)
    return {"dir": run_dir, "summary": summary, "history": history}


REWRITE_SUMMARY = ("rerun the command that made the run (it writes summary.json again from the "
                   "last checkpoint), or delete the file")
REWRITE_METRICS = "delete the file (the report then takes the final numbers from summary.json)"


def _parsed(path, read, fix: str):
    """``read()``, or one line naming ``path`` when it is cut short or not JSON (a driver killed
    while writing it, a bad copy)."""
    try:
        return read()
    except ValueError as exc:  # json's JSONDecodeError
        raise KdRayError(f"{path} is cut short or not valid JSON ({exc}): {fix}") from None


def find_runs(paths) -> list[dict]:
    """Each path is a run folder, or a pipeline folder whose subfolders are runs (unfinished ones
    are skipped with a warning naming them)."""
    runs = []
    for path in map(location, paths):
        if (path / "summary.json").is_file() or is_unfinished(path):
            runs.append(load_run(path))
            continue
        subs = sorted(p for p in path.glob("*") if (p / "summary.json").is_file())
        unfinished = sorted(p for p in path.glob("*") if p.is_dir() and is_unfinished(p))
        if not subs:
            hint = "; ".join(_unfinished(p) for p in unfinished)
            hint = f" ({hint}: rerun to finish)" if hint else ""
            raise KdRayError(f"no finished runs under {path}{hint}: pass run or pipeline folders")
        for folder in unfinished:
            log.warning(f"skipping run {_unfinished(folder)}: rerun its command to finish it")
        runs.extend(load_run(p) for p in subs)
    return runs


def final_top1(run: dict) -> float:
    if run["history"]:
        return run["history"][-1]["val/top1"]
    return run["summary"]["final"]["val/top1"]


def test_top1(run: dict):
    """The run's test top-1 (after its last epoch), or None without a test split."""
    return run["summary"].get("final", {}).get("test/top1")


def comparison_rows(runs: list[dict], failed=()) -> list[dict]:
    """One row per (stage, architecture, label): mean and spread of final top-1 over seeds.

    ``label`` (in summary.json, set by the pipeline) tells apart runs of one stage and
    architecture: other methods, an assistant of a chain, a student distilled via one.
    ``failed``: failure records (runs.summary.failed_runs); each counts in its label's row, and a
    label none of whose runs finished gets a row of its own that says why."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        summary = run["summary"]
        label = summary.get("label") or ROLE_NAMES.get(summary["stage"], summary["stage"])
        groups.setdefault((summary["stage"], summary["arch"], label), []).append(run)
    failures: dict[tuple, list[dict]] = {}
    for record in failed:
        failures.setdefault((record["stage"], record["label"]), []).append(record)
    rows = []
    order = {s: i for i, s in enumerate(ROLE_ORDER)}
    keys = sorted(groups, key=lambda k: (order.get(k[0], 9), min(r["dir"].name for r in groups[k])))
    for (stage, arch, label), members in ((k, groups[k]) for k in keys):
        accs = [100 * final_top1(r) for r in members]
        tests = [100 * t for t in map(test_top1, members) if t is not None]
        speeds = [r["summary"].get("images_per_s") or 0.0 for r in members]
        lost = failures.pop((stage, label), [])
        rows.append({
            "model": label, "arch": arch, "runs": len(members),
            "top1_mean": statistics.fmean(accs), "top1_std": _std(accs),
            "top1_min": min(accs), "top1_max": max(accs),
            "test_mean": statistics.fmean(tests) if len(tests) == len(members) else None,
            "test_std": _std(tests) if len(tests) == len(members) else None,
            "params": members[0]["summary"]["params"],
            "images_per_s": statistics.median(speeds),
            "failed": len(lost), "error": lost[0]["error"] if lost else "",
        })
    for (stage, label), lost in failures.items():  # nothing of this row finished
        rows.append({"model": label, "arch": "-", "runs": 0, "top1_mean": None, "top1_std": None,
                     "top1_min": None, "top1_max": None, "test_mean": None, "test_std": None,
                     "params": None, "images_per_s": None, "failed": len(lost),
                     "error": lost[0]["error"]})
    return rows


def _std(values: list) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(mean, std) -> str:
    return "-" if mean is None else f"{mean:.2f} ± {std:.2f}"


def markdown_table(rows: list[dict]) -> str:
    deploy = any("cpu_ms" in r for r in rows)  # tradeoff.add_deploy_columns ran
    test = any(r.get("test_mean") is not None for r in rows)
    failed = any(r.get("failed") for r in rows)
    lines = ["| model | arch | runs | val top-1 % (mean ± std) | min–max |"
             + (" test top-1 % |" if test else "") + " params | train images/s |"
             + (" size MB | MACs | CPU ms (b1, 1 thread) | agreement with teacher % |" if deploy else "")
             + (" failed |" if failed else ""),
             "|---|---|---:|---:|---:|" + ("---:|" if test else "") + "---:|---:|"
             + ("---:|---:|---:|---:|" if deploy else "") + ("---|" if failed else "")]
    for r in rows:
        spread = "-" if r["top1_min"] is None else f"{r['top1_min']:.2f}–{r['top1_max']:.2f}"
        lines.append(
            f"| {r['model']} | {r['arch']} | {r['runs']} | {_cell(r['top1_mean'], r['top1_std'])} "
            f"| {spread} |" + (f" {_cell(r.get('test_mean'), r.get('test_std'))} |" if test else "")
            + (f" {r['params']:,} |" if r["params"] is not None else " - |")
            + (f" {r['images_per_s']:.0f} |" if r["images_per_s"] is not None else " - |")
            + (cells(r) if deploy else "")
            + (f" {r['failed']}: {r['error']} |" if failed and r.get("failed") else " |" if failed else "")
        )
    return "\n".join(lines)


def plot_accuracy(runs: list[dict], path) -> None:
    """Validation top-1 per epoch: mean over seeds per model, min-max band."""
    import matplotlib  # local: slow to import, and only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        summary = run["summary"]
        label = summary.get("label") or ROLE_NAMES.get(summary["stage"], summary["stage"])
        groups.setdefault((summary["stage"], label), []).append(run)
    order = {s: i for i, s in enumerate(ROLE_ORDER)}
    for stage, name in sorted(groups, key=lambda k: order.get(k[0], 9)):
        members = groups[(stage, name)]
        curves = [[100 * h["val/top1"] for h in r["history"]] for r in members]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        epochs = list(range(1, n + 1))
        cols = list(zip(*[c[:n] for c in curves]))
        mean = [statistics.fmean(c) for c in cols]
        label = f"{name} ({members[0]['summary']['arch']})"
        line, = ax.plot(epochs, mean, marker="o", ms=3, label=label)
        if len(curves) > 1:
            ax.fill_between(epochs, [min(c) for c in cols], [max(c) for c in cols],
                            color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Validation accuracy with and without distillation")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_report(out_dir, runs: list[dict], deploy: bool = True, failed=()) -> str:
    """Write comparison.md, comparison.csv, accuracy.png and (``deploy``: size, MACs, CPU latency
    and teacher agreement per row) tradeoff.png into ``out_dir``; return the table. ``failed``:
    failure records of runs that did not finish (a column, and rows of their own)."""
    out_dir = location(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(runs, failed)
    if deploy:
        add_deploy_columns(rows, runs)
        plot_tradeoff(rows, out_dir / "tradeoff.png")
    table = markdown_table(rows)
    write_tables(out_dir / "comparison", rows, table)
    plot_accuracy(runs, out_dir / "accuracy.png")
    return table


def write_tables(stem: Path, rows: list[dict], markdown: str) -> None:
    """``<stem>.md`` (the markdown table) and ``<stem>.csv`` (the rows)."""
    stem.with_name(stem.name + ".md").write_text(markdown + "\n")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    stem.with_name(stem.name + ".csv").write_text(text.getvalue())
