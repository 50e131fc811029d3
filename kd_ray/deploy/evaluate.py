"""``kd-ray eval``: a run's student (or any model file) on a split, in this process.

Top-1/top-5, cross-entropy, per-class accuracy, a confusion matrix, expected calibration error
with a reliability diagram and, when the run distilled from a teacher, the student's fidelity to
it: top-1 agreement and mean KL(teacher || student) (Stanton et al., NeurIPS 2021). The images
go through the dataset's own validation transform (data.datasets.make_transform), so a run's
``val`` numbers equal its last epoch's.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from kd_ray.deploy.loading import open_model
from kd_ray.deploy.model import Model, has_teacher
from kd_ray.errors import ConfigError, ModelFileError

ECE_BINS = 15


def split_dataset(cfg, split: str, image_size: int):
    """The split's images through the validation transform, with their true labels."""
    from kd_ray.data import load_source  # local: heavy
    from kd_ray.data.datasets import View, make_transform

    if split not in ("val", "train"):
        raise ConfigError(f"--split {split!r}: choose val or train")
    src = load_source(cfg.data)
    raw_train, raw_val = src.open(image_size)
    raw, labels = (raw_val, src.val_labels) if split == "val" else (raw_train, src.train_labels)
    view = View(raw, make_transform(src, image_size, False, False), np.arange(len(raw)), labels)
    return view, src.classes


def collect_logits(models: list[Model], dataset, batch_size: int = 256):
    """(labels, [logits per model]) over the dataset, in dataset order."""
    from torch.utils.data import DataLoader  # local: heavy

    labels, outs = [], [[] for _ in models]
    for images, targets in DataLoader(dataset, batch_size=batch_size):
        batch = images.numpy()
        labels.append(targets.numpy())
        for out, model in zip(outs, models):
            out.append(model.logits(batch).astype(np.float64))
    return np.concatenate(labels), [np.concatenate(o) for o in outs]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
    """ECE and the per-bin (confidence, accuracy, count) of equal-width confidence bins."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            c, a = float(conf[mask].mean()), float(correct[mask].mean())
            ece += mask.mean() * abs(a - c)
            rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "confidence": c,
                         "accuracy": a, "count": int(mask.sum())})
    return float(ece), rows


def metrics_of(logits: np.ndarray, labels: np.ndarray, classes: list[str],
               teacher: np.ndarray | None = None) -> dict:
    logp = log_softmax(logits)
    pred = logits.argmax(axis=1)
    k = min(5, logits.shape[1])
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    n = len(classes)
    confusion = np.bincount(labels * n + pred, minlength=n * n).reshape(n, n)
    per_class = {c: float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None
                 for i, c in enumerate(classes)}
    ece, bins = calibration(np.exp(logp), labels)
    out = {"count": int(len(labels)), "top1": float((pred == labels).mean()),
           "loss": float(-logp[np.arange(len(labels)), labels].mean()), "ece": ece,
           "per_class_top1": per_class, "confusion": confusion.tolist(), "reliability": bins}
    if n >= 5:
        out["top5"] = float((topk == labels[:, None]).any(axis=1).mean())
    if teacher is not None:
        t_logp = log_softmax(teacher)
        out["teacher_top1"] = float((teacher.argmax(axis=1) == labels).mean())
        out["teacher_agreement"] = float((teacher.argmax(axis=1) == pred).mean())
        out["teacher_kl"] = float((np.exp(t_logp) * (t_logp - logp)).sum(axis=1).mean())
    return out


def evaluate_target(target, cfg=None, split: str = "val", out=None, which: str = "student",
                    teacher: bool = True) -> tuple[dict, Path, np.ndarray]:
    """Evaluate; writes metrics.json, per_class.csv, predictions.csv and two PNGs into ``out``
    (default: <run>/eval_<split>, or <file>_eval_<split> beside a model file). Returns
    (metrics, folder, predicted class indices)."""
    model = open_model(target, which)
    cfg = cfg or model.extra.get("config")
    if cfg is None:
        raise ConfigError(f"{target} is a model file: pass -c CONFIG naming its dataset (data.*)")
    dataset, data_classes = split_dataset(cfg, split, model.meta["image_size"])
    if [str(c) for c in data_classes] != model.classes:
        raise ModelFileError(f"{target} predicts {len(model.classes)} classes that are not the "
                             f"dataset's {len(data_classes)}: pass the config of its dataset")
    models = [model]
    if teacher and model.kind == "run" and model.extra["stage"] != "teacher" and has_teacher(
            model.extra["config"]):
        models.append(open_model(target, "teacher"))
    labels, logits = collect_logits(models, dataset)
    metrics = metrics_of(logits[0], labels, model.classes, logits[1] if len(logits) > 1 else None)
    metrics.update(split=split, model=str(target), arch=model.meta["arch"])
    path = Path(target)
    folder = Path(out) if out else (path / f"eval_{split}" if path.is_dir()
                                    else path.with_name(f"{path.stem}_eval_{split}"))
    write_outputs(folder, metrics, model.classes, logits[0].argmax(axis=1), labels)
    return metrics, folder, logits[0].argmax(axis=1)


def write_outputs(folder: Path, metrics: dict, classes, pred, labels) -> None:
    """All files into a temporary folder, then one rename (an older result is replaced whole)."""
    from kd_ray.deploy.plots import plot_confusion, plot_reliability  # local: matplotlib

    tmp = folder.with_name(f".tmp_{os.getpid()}_{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        lines = ["class,top1,count"] + [
            f"{c},{'' if a is None else f'{a:.6f}'},{sum(metrics['confusion'][i])}"
            for i, (c, a) in enumerate(metrics["per_class_top1"].items())]
        (tmp / "per_class.csv").write_text("\n".join(lines) + "\n")
        rows = ["index,label,predicted"] + [f"{i},{classes[y]},{classes[p]}"
                                            for i, (y, p) in enumerate(zip(labels, pred))]
        (tmp / "predictions.csv").write_text("\n".join(rows) + "\n")
        plot_confusion(np.asarray(metrics["confusion"]), classes, tmp / "confusion.png")
        plot_reliability(metrics["reliability"], metrics["ece"], tmp / "reliability.png")
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summary_lines(metrics: dict) -> list[str]:
    lines = [f"{metrics['arch']} on {metrics['split']} ({metrics['count']} images): "
             f"top-1 {100 * metrics['top1']:.2f}%"
             + (f", top-5 {100 * metrics['top5']:.2f}%" if "top5" in metrics else "")
             + f", loss {metrics['loss']:.4f}, ECE {100 * metrics['ece']:.2f}%"]
    if "teacher_agreement" in metrics:
        lines.append(f"teacher: top-1 {100 * metrics['teacher_top1']:.2f}%, agreement "
                     f"{100 * metrics['teacher_agreement']:.2f}%, mean KL(teacher||student) "
                     f"{metrics['teacher_kl']:.4f}")
    worst = sorted((a, c) for c, a in metrics["per_class_top1"].items() if a is not None)[:3]
    lines.append("lowest classes: " + ", ".join(f"{c} {100 * a:.1f}%" for a, c in worst))
    return lines
