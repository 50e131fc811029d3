"""Before/after table of the training defaults (issue 22): kd, dkd, dist, fitnets, at and the
labels-only student on two datasets, several seeds, under the old defaults and candidate ones.

Stages run in this process through worker.train_loop with a local 1-rank session (no Ray start:
~20 s saved per run). One JSONL row per finished run; a rerun skips rows already there.

    PYTHONPATH=$PWD python scripts/defaults_table.py \\
        --after "optim.clip_grad_norm=5 optim.warmup_epochs=1" --out benchmarks/defaults_raw.jsonl

An --after may carry a name: --after "clipT1: optim.clip_grad_norm=5 distill.temperature=1".
Each candidate is applied over the "before" overrides (so T stays 4 unless the candidate sets it).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from kd_ray.cache import resolve
from kd_ray.cluster.stage import make_loop_config
from kd_ray.cluster.worker import train_loop
from kd_ray.config import load_config
from kd_ray.data import write_digits_imagefolder
from kd_ray.engine import checkpoints
from kd_ray.errors import KdRayError, from_payload
from kd_ray.models import build_model
from kd_ray.runs.files import prune_checkpoints
from kd_ray.runs.summary import export_run_teacher

ROOT = Path(__file__).resolve().parent.parent
BEFORE = ["optim.clip_grad_norm=null", "optim.warmup_epochs=0", "distill.temperature=4.0"]
METHODS = ["baseline", "kd", "dkd", "dist", "fitnets", "at"]
# Feature layers with matching spatial size (printed at start). demo at 28 px: cnn_teacher's
# 14x14 block ends at "6" (pool), its 7x7 at "13"; tiny_cnn's pools "2" (14x14) and "5" (7x7).
# digits64 at 64 px: resnet18 relu 32x32, layer1 16x16; simple_cnn "2" 32x32, "7" 16x16.
LAYERS = {
    "demo": {"fitnets": ["distill.params.student_layer='5'", "distill.params.teacher_layer='13'"],
             "at": ["distill.params.student_layers=['2','5']", "distill.params.teacher_layers=['6','13']"]},
    "digits64": {"fitnets": ["distill.params.student_layer='7'", "distill.params.teacher_layer=layer1"],
                 "at": ["distill.params.student_layers=['2','7']",
                        "distill.params.teacher_layers=[relu,layer1]"]},
}


class LocalSession:
    """train_loop's side here: rank 0 of 1 on the CPU, checkpoints kept to one, metrics remembered."""

    rank, world = 0, 1
    device = torch.device("cpu")

    def __init__(self):
        self.history: list = []

    def prepare(self, model):
        return model.to(self.device)

    def report(self, metrics: dict, state, run_dir, history: list) -> None:
        checkpoints.save(run_dir, state, history)
        prune_checkpoints(run_dir, 1)
        self.history = list(history)


def dataset_overrides(name: str, data_dir: Path) -> tuple[str | None, list[str]]:
    if name == "demo":  # configs/demo.yaml's data and models; its optim keys are overridden below
        return str(ROOT / "configs" / "demo.yaml"), []
    root = write_digits_imagefolder(data_dir / "digits64")  # the same tree as scripts/make_digits_tree.py
    return None, ["data.name=imagefolder", f"data.root={root}", "data.image_size=64",
                  "data.labels_per_class=10", "model.teacher=resnet18", "model.student=simple_cnn",
                  "optim.epochs=10", "optim.teacher_epochs=12", "optim.lr=0.02", "distill.alpha=0.9"]


def run_stage(path, overrides: list[str], stage: str, run_dir: Path, cache_dir: Path | None = None):
    """(history, error, seconds) of one stage trained here from scratch."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(path, overrides + ["run.num_workers=1", f"run.storage={run_dir.parent}",
                                         f"run.name={run_dir.name}"])
    started = time.perf_counter()
    if cache_dir is not None:  # logit methods: the teacher's logits once (feature methods: "off")
        cfg = resolve(cfg, cache_dir)
    session = LocalSession()
    try:
        error = from_payload(train_loop(make_loop_config(cfg, stage, str(run_dir.parent), run_dir.name),
                                        session))
    except KdRayError as exc:
        error = exc
    return cfg, session.history, error, time.perf_counter() - started


def train_teacher(name: str, path, base: list[str], work: Path) -> tuple[str, float]:
    """teacher.pt of the dataset (seed 0, clip 5 and warm-up 0.5: the same teacher for every row)."""
    run_dir = work / name / "teacher"
    out = run_dir / "teacher.pt"
    info = run_dir / "teacher.json"
    if info.exists():
        return str(out), json.loads(info.read_text())["val_top1"]
    over = base + ["optim.clip_grad_norm=5", "optim.warmup_epochs=0.5", "distill.teacher_cache=off"]
    _, history, error, seconds = run_stage(path, over, "teacher", run_dir)
    if error is not None:
        sys.exit(f"teacher of {name} failed: {error}")
    _, _, state = checkpoints.latest(run_dir, with_state=True)
    model = build_model(state["arch"], len(state["classes"]))
    model.load_state_dict(state["model"])
    top1 = history[-1]["val/top1"]
    export_run_teacher(run_dir, model, state, {"final": history[-1]})
    info.write_text(json.dumps({"val_top1": top1, "seconds": seconds, "arch": state["arch"]}))
    print(f"[{name}] teacher {state['arch']}: val top-1 {top1:.4f} in {seconds:.0f}s", flush=True)
    return str(out), top1


def done_keys(out: Path) -> set:
    if not out.exists():
        return set()
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return {(r["dataset"], r["overrides"], r["method"], r["seed"]) for r in rows}


def parse_settings(afters: list[str], only: list[str] | None) -> list[tuple[str, list[str]]]:
    settings = [("before", BEFORE)]
    for k, text in enumerate(afters, 1):
        name, sep, rest = text.partition(":")
        name, text = (name.strip(), rest) if sep and "=" not in name else (f"after{k}", text)
        settings.append((name, BEFORE + text.split()))
    return [s for s in settings if not only or s[0] in only]


def one_run(args, name, path, base, teacher, setting, over, method, seed, work, num_classes=10):
    stage = "student" if method == "baseline" else "distill"
    extra = [] if method == "baseline" else [f"distill.loss={method}", f"distill.teacher_path={teacher}",
                                             "distill.teacher_cache=auto"]
    overrides = base + over + extra + LAYERS[name].get(method, []) + [f"run.seed={seed}"]
    if args.epochs:
        overrides.append(f"optim.epochs={args.epochs}")
    run_dir = work / name / "runs" / f"{setting}-{method}-s{seed}"
    cache = work / name / "teacher_cache" if stage == "distill" else None
    cfg, history, error, seconds = run_stage(path, overrides, stage, run_dir, cache_dir=cache)
    shutil.rmtree(run_dir, ignore_errors=True)
    final = history[-1]["val/top1"] if history else None
    losses = [h.get("train/loss", 0.0) for h in history]
    collapsed = (error is not None or final is None or final <= 1.5 / num_classes
                 or not all(math.isfinite(x) for x in losses))
    return {"dataset": name, "setting": setting, "overrides": " ".join(over), "method": method,
            "seed": seed, "final_top1": final,
            "best_top1": max((h["val/top1"] for h in history), default=None),
            "epochs_done": len(history), "epochs": cfg.optim.epochs, "collapsed": collapsed,
            "error": str(error).splitlines()[0] if error else None,
            "temperature": cfg.distill.temperature, "seconds": round(seconds, 1)}


def table(rows: list[dict], teachers: dict) -> str:
    named = list(dict.fromkeys(r["setting"] for r in rows))
    settings = [s for s in ("before", "after") if s in named] + sorted(set(named) - {"before", "after"})
    # The labels-only student ignores distill.*: a setting that differs only in T shares its baseline.
    runs_of = {r["setting"]: optim_part(r["overrides"]) for r in rows}
    lines = ["| dataset | method | " + " | ".join(settings) + " |",
             "|---" * (len(settings) + 2) + "|"]
    cell = {}
    for r in rows:
        cell.setdefault((r["dataset"], r["method"], r["setting"]), []).append(r)
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        base = {s: mean_of([r for r in rows if r["dataset"] == dataset and r["method"] == "baseline"
                            and optim_part(r["overrides"]) == runs_of[s]]) for s in settings}
        for method in METHODS:
            parts = []
            for s in settings:
                runs = cell.get((dataset, method, s), [])
                if not runs:
                    parts.append("-")
                    continue
                tops = [100 * (r["final_top1"] or 0.0) for r in runs]
                sd = statistics.stdev(tops) if len(tops) > 1 else 0.0
                text = f"{statistics.mean(tops):.1f} ± {sd:.1f}"
                if method != "baseline" and base[s] is not None:
                    text += f" ({statistics.mean(tops) - base[s]:+.1f})"
                text += f" [{sum(r['collapsed'] for r in runs)}/{len(runs)}]"
                parts.append(text)
            label = "labels-only" if method == "baseline" else method
            if method == "baseline" and dataset in teachers:
                label += f" (teacher {100 * teachers[dataset]:.1f})"
            lines.append(f"| {dataset} | {label} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def optim_part(overrides: str) -> str:
    return " ".join(o for o in overrides.split() if not o.startswith("distill."))


def mean_of(runs: list[dict]):
    return statistics.mean(100 * (r["final_top1"] or 0.0) for r in runs) if runs else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--after", action="append", default=[], help="a candidate's overrides (space-separated)")
    p.add_argument("--datasets", nargs="+", default=["demo", "digits64"])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", help="run only these setting names (before, after1, ...)")
    p.add_argument("--epochs", type=int, help="student epochs instead of the dataset's (a cost probe)")
    p.add_argument("--out", default="benchmarks/defaults_raw.jsonl")
    p.add_argument("--work", default="/tmp/kd_defaults", help="runs, teachers, caches, the digits64 PNGs")
    p.add_argument("--table-only", action="store_true", help="print the table of --out and stop")
    args = p.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.parent.mkdir(parents=True, exist_ok=True)
    teachers = {}
    if not args.table_only:
        settings = parse_settings(args.after, args.settings)
        for name in args.datasets:
            path, base = dataset_overrides(name, work)
            print(f"[{name}] layers: {LAYERS[name]}", flush=True)
            teacher, teachers[name] = train_teacher(name, path, base, work)
            for setting, over in settings:
                for method in args.methods:
                    for seed in args.seeds:
                        if (name, " ".join(over), method, seed) in done_keys(out):
                            continue
                        row = one_run(args, name, path, base, teacher, setting, over, method, seed, work)
                        with out.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(f"[{name}] {setting} {method} s{seed}: final {row['final_top1']} "
                              f"best {row['best_top1']} collapsed={row['collapsed']} "
                              f"{row['seconds']}s {row['error'] or ''}", flush=True)
    for name in ("demo", "digits64"):
        info = work / name / "teacher" / "teacher.json"
        if info.exists():
            teachers.setdefault(name, json.loads(info.read_text())["val_top1"])
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    print(table(rows, teachers))


if __name__ == "__main__":
    main()
