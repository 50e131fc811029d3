"""The methods table of docs/methods/compare.md, on the demo protocol (MNIST subset, the teacher on all labels,
the student on 10 labels per class plus the unlabelled transfer set, 3 seeds), from kd_ray's own
commands run in this order (each step is skipped when its output exists, so a rerun resumes):

  1. two teachers (`kd-ray train-teacher`, seeds 0 and 1): A for everything, A+B as an ensemble;
  2. one `kd-ray tune` per method over its temperature and main parameter (seed 0, no early
     stopping), chosen on the validation split;
  3. `kd-ray compare` of every method above, each at its own best T and value
     (distill.method_params), from teacher A, with a teacher-assistant chain (teacher ->
     simple_cnn -> student);
  4. `kd-ray compare --methods kd` from the 2-teacher ensemble A+B;
then writes benchmarks/methods.md: the sweeps' summaries and one table of every row. Every run
holds out data.test_fraction=0.2 of the training images as a test split: selection reads the
validation split only, the table reports the test split (read once per run, after its last epoch).

    python scripts/methods_table.py [--storage results/methods] [--out benchmarks/methods.md]
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

CONFIG = "configs/demo.yaml"
TEST = {"data.test_fraction": 0.2}  # a test split the choices never see
# The student's feature layers (tiny_cnn: ReLUs at 28 and 14 px) and the teacher's of the same size
# (cnn_teacher: the second ReLU of each block).
FEATURES = {
    "fitnets": {"student_layer": "4", "teacher_layer": "12"},
    "at": {"student_layers": ["1", "4"], "teacher_layers": ["5", "12"]},
    "reviewkd": {"student_layers": ["1", "4"], "teacher_layers": ["5", "12"]},
    # The flattened pooled features that feed each classifier; 4,096 negatives (the training set
    # has 3,200 images here, the paper's 16,384 would only draw the same rows more often).
    "crd": {"student_layer": "7", "teacher_layer": "22", "nce_k": 4096},
}
# Each method's main parameter and the values swept (the others at their defaults): about 25
# trials of 8 epochs, which fits the table in about an hour on 2 cores.
SWEEPS = {
    "kd": {"distill.temperature": [1, 2, 4, 8]},
    "dkd": {"distill.temperature": [2, 4], "distill.params.beta": [1, 2]},
    "dist": {"distill.temperature": [1, 4], "distill.params.beta": [1, 4]},
    "fitnets": {"distill.params.weight": [1, 10, 100]},
    "at": {"distill.params.beta": [1000, 10000, 100000]},
    "crd": {"distill.params.weight": [0.8, 2]},
    "reviewkd": {"distill.params.weight": [1, 5]},
    "ctkd": {"distill.alpha": [0.5, 0.9]},  # its temperature is learnt
    "mlkd": {"distill.params.kd_weight": [0.5, 1]},
}
SHARED = ("temperature", "alpha")  # distill-section keys a method_params entry may set
ASSISTANT = "simple_cnn"


def kd_ray(*args: str) -> None:
    command = [str(Path(sys.executable).with_name("kd-ray")), *args]
    print("$ kd-ray " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def sets(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
        out += ["--set", f"{key}={text.removesuffix('...').strip()}"]
    return out


def teacher(storage: Path, name: str, seed: int) -> str:
    path = storage / name / "teacher.pt"
    if not path.exists():
        kd_ray("train-teacher", "-c", CONFIG, *sets({"run.storage": str(storage), "run.name": name,
                                                     "run.seed": seed, **TEST}))
    return str(path)


def sweep(storage: Path, method: str, teacher_a: str) -> dict:
    """The best params of the method's sweep (its best.yaml), after running it if need be."""
    folder = storage / f"sweep-{method}"
    if not (folder / "best.yaml").exists():
        if folder.exists():  # an interrupted sweep: start it over (its trials are short)
            shutil.rmtree(folder)
        kd_ray("tune", "-c", CONFIG, *sets({
            "run.storage": str(storage), "run.name": folder.name, "run.num_workers": 1,
            "run.seeds": [0], "distill.loss": method, "distill.teacher_path": teacher_a,
            "distill.params": FEATURES.get(method, {}), "sweep.space": SWEEPS[method],
            "sweep.scheduler": "none", **TEST}))
    best = yaml.safe_load((folder / "best.yaml").read_text())["distill"]
    swept = {key.split(".")[-1] for key in SWEEPS[method]}
    chosen = {key: best[key] for key in SHARED if key in swept}  # its own T (and alpha)
    return {**chosen, **{k: v for k, v in (best.get("params") or {}).items() if k in swept}}


def compare(storage: Path, name: str, methods: list[str], values: dict) -> Path:
    root = storage / name
    if not (root / "methods.csv").exists():
        kd_ray("compare", "-c", CONFIG, "--methods", *methods,
               *sets({"run.storage": str(storage), "run.name": name, **values}))
    return root


def teacher_top1(paths: list[str]) -> float:
    """Val top-1 % of one teacher file or of the ensemble of several (equal weights)."""
    import torch
    from torch.utils.data import DataLoader

    from kd_ray.config import load_config
    from kd_ray.data import build_data
    from kd_ray.engine import evaluate
    from kd_ray.models import load_teachers

    bundle = build_data(load_config(CONFIG).data, "distill", 0)
    model = load_teachers(paths, None, bundle.image_size, bundle.norm)
    sums = evaluate(model, DataLoader(bundle.val, batch_size=256), device=torch.device("cpu"))
    return 100 * float(sums["correct1"]) / float(sums["count"])


def read_rows(root: Path, rename: dict) -> list[dict]:
    with open(root / "methods.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        label = row["method"]
        if label.startswith("student, distilled (") and label.endswith(")"):
            label = label[len("student, distilled ("):-1]
        row["method"] = rename.get(label, label)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default="results/methods")
    parser.add_argument("--out", default="benchmarks/methods.md")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    storage = Path(args.storage).resolve()
    teacher_a, teacher_b = teacher(storage, "teacher-a", 0), teacher(storage, "teacher-b", 1)
    best = {method: sweep(storage, method, teacher_a) for method in SWEEPS}
    method_params = {m: {**FEATURES.get(m, {}), **p} for m, p in best.items()}
    main_root = compare(storage, "compare", list(SWEEPS), {
        "distill.method_params": method_params, "distill.teacher_path": teacher_a,
        "model.assistants": [ASSISTANT], **TEST})
    ensemble_root = compare(storage, "compare-ensemble", ["kd"], {
        "distill.method_params": {"kd": best["kd"]}, "distill.teacher_path": [teacher_a, teacher_b], **TEST})
    rows = read_rows(main_root, {f"student, distilled via {ASSISTANT}":
                                 f"kd via assistant {ASSISTANT} (TA chain)"})
    rows += read_rows(ensemble_root, {"kd": "kd from a 2-teacher ensemble"})
    teachers = {"teacher A (seed 0)": teacher_top1([teacher_a]), "teacher B (seed 1)": teacher_top1([teacher_b]),
                "ensemble A+B": teacher_top1([teacher_a, teacher_b])}
    with open(main_root / "comparison.csv") as f:
        baseline = next(r for r in csv.DictReader(f) if r["model"] == "student, labels only")
    began = min(p.stat().st_mtime for p in storage.glob("teacher-*/config.yaml"))
    ended = max(p.stat().st_mtime for p in storage.glob("compare*/methods.csv"))
    write(Path(args.out), storage, rows, best, ended - began, teachers, baseline)


def write(out: Path, storage: Path, rows: list[dict], best: dict, seconds: float,
          teachers: dict, baseline: dict) -> None:
    lines = [f"# Methods on the demo protocol ({time.strftime('%Y-%m-%d %H:%M')}, "
             "`python scripts/methods_table.py`)", "",
             "Teacher cnn_teacher on all 4,000 labelled MNIST-subset images; student tiny_cnn with 10 "
             "labels per class plus the other 3,900 training images unlabelled; 8 epochs; seeds 0, 1, 2; "
             "800 of the training images held out as the test split (data.test_fraction 0.2). Each "
             "method's temperature and main parameter were swept first (seed 0, one `kd-ray tune` "
             "each, chosen on the 1,000 validation images); the table uses each method's own best "
             "values and reports the test split, which no choice read. "
             f"Training time, first teacher to last methods table (from the run folders): {seconds / 60:.0f} "
             f"min on {os.cpu_count()} CPU cores. Agreement is with the run's own teacher (the ensemble "
             "row: with the ensemble; the TA row: with teacher A).", "",
             "Teachers, val top-1: " + ", ".join(f"{k} {v:.2f}%" for k, v in teachers.items())
             + f". Student on its 100 labels alone: test {float(baseline['test_mean']):.2f} ± "
             f"{float(baseline['test_std']):.2f}% (val {float(baseline['top1_mean']):.2f}).", "",
             "| method | test top-1 % (mean ± std) | val top-1 % | agreement with teacher % | train images/s | teacher cache |",
             "|---|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {float(row['test_mean']):.2f} ± {float(row['test_std']):.2f} | "
                     f"{float(row['top1_mean']):.2f} ± {float(row['top1_std']):.2f} | "
                     f"{float(row['agreement_mean']):.2f} | {float(row['images_per_s']):.0f} | {row['cache']} |")
    lines += ["", "Chosen values (on val): " + "; ".join(f"{m} {p}" for m, p in best.items()), "",
              "## Sweeps", ""]
    for method in SWEEPS:
        summary = storage / f"sweep-{method}" / "summary.md"
        lines += [f"### {method}: {', '.join(SWEEPS[method])}", "", summary.read_text().strip(), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
