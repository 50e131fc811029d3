"""``kd-ray predict``: top-k classes of image files with a run folder or an exported model.

An ONNX file runs on ONNX Runtime with NumPy preprocessing (deploy.images): no torch needed.
Images that cannot be decoded are reported by path; the others are still classified.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from kd_ray.deploy.images import list_images, load_images
from kd_ray.deploy.loading import open_model
from kd_ray.errors import ModelFileError


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict(target, images, top_k: int = 5, batch_size: int = 64, which: str = "student"):
    """(rows, bad): one row per decoded image {path, top: [(class, prob), ...]}; bad: (path, why)."""
    model = open_model(target, which)
    paths = list_images(images)
    if not paths:
        raise ModelFileError(f"no image files in {', '.join(map(str, images))}")
    k = min(top_k, len(model.classes))
    rows, bad = [], []
    for start in range(0, len(paths), batch_size):
        arrays, kept, failed = load_images(paths[start:start + batch_size], model.meta["preprocess"])
        bad.extend(failed)
        if not arrays:
            continue
        probs = softmax(model.logits(np.stack(arrays)).astype(np.float64))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        for path, p, idx in zip(kept, probs, order):
            rows.append({"path": str(path), "top": [(model.classes[i], float(p[i])) for i in idx]})
    return rows, bad


def table(rows: list[dict]) -> str:
    width = max([len(r["path"]) for r in rows] + [5])
    lines = [f"{'image':<{width}}  top classes (probability)"]
    for r in rows:
        lines.append(f"{r['path']:<{width}}  " + "  ".join(f"{c} {p:.3f}" for c, p in r["top"]))
    return "\n".join(lines)


def as_csv(rows: list[dict]) -> str:
    k = max((len(r["top"]) for r in rows), default=0)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path"] + [f"top{i + 1}_{name}" for i in range(k) for name in ("class", "prob")])
    for r in rows:
        writer.writerow([r["path"]] + [v for c, p in r["top"] for v in (c, f"{p:.6f}")])
    return buf.getvalue()


def as_json(rows: list[dict], bad) -> str:
    return json.dumps({"predictions": [{"path": r["path"], "top": [{"class": c, "prob": p}
                                                                  for c, p in r["top"]]}
                                       for r in rows],
                       "unreadable": [{"path": str(p), "error": why} for p, why in bad]}, indent=2)


def write_atomic(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".tmp_{os.getpid()}_{path.name}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
