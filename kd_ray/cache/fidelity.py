"""How far a lossy cache encoding moves a method's loss, and the driver's refusal when too far.

The measure: on a batch of confident teacher logits (``confident_teacher``: 8 * randn with the
label's class raised above the rest), the method's loss from the logits the cache would serve
(``rows.roundtrip``) against its loss from the float32 logits, relative, the largest over two
students (an untrained one, random logits; one half-way to the teacher). Labels are -1 (no labels)
so that only the teacher's terms count: CE does not depend on the encoding.
"""
from __future__ import annotations

import numpy as np
import torch

from kd_ray.cache.rows import roundtrip
from kd_ray.cache.store import choose_encoding
from kd_ray.config import Config
from kd_ray.errors import ConfigError
from kd_ray.methods import build_method

TOLERANCE = 0.01  # largest relative loss error an encoding may cause
ROWS = 64


def confident_teacher(classes: int, rows: int = ROWS, seed: int = 0) -> np.ndarray:
    """Float32 logits [rows, classes]: 8 * N(0, 1), the label's class 4 above the row's maximum."""
    rng = np.random.default_rng(seed)
    logits = (8 * rng.standard_normal((rows, classes))).astype(np.float32)
    labels = rng.integers(0, classes, rows)
    logits[np.arange(rows), labels] = logits.max(axis=1) + 4
    return logits


def students(teacher: np.ndarray, seed: int = 1) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(teacher.shape).astype(np.float32)
    return [torch.from_numpy(noise), torch.from_numpy(0.5 * teacher + 2 * noise)]


def loss_error(method, teacher: np.ndarray, served: np.ndarray) -> float:
    """Largest relative change of ``method``'s loss when ``served`` stands in for ``teacher``."""
    labels = torch.full((len(teacher),), -1, dtype=torch.long)
    exact, approx = torch.from_numpy(teacher), torch.from_numpy(served.astype(np.float32))
    worst = 0.0
    with torch.no_grad():
        for student in students(teacher):
            ref = float(method.loss(student, exact, labels)["loss"])
            got = float(method.loss(student, approx, labels)["loss"])
            worst = max(worst, abs(got - ref) / max(abs(ref), 1e-12))
    return worst


def encoding_error(distill_cfg, encoding: str, top_k: int | None, classes: int, method=None) -> float:
    """``loss_error`` of distill.loss (with its params and temperature) under ``encoding``;
    ``method``: that method already set up (one with trainable extras), else built here."""
    teacher = confident_teacher(classes)
    method = method if method is not None else build_method(distill_cfg)
    was = method.training
    try:
        return loss_error(method.eval(), teacher, roundtrip(teacher, encoding, top_k))
    finally:
        method.train(was)


def check_encoding(cfg: Config, classes: int, method=None) -> None:
    """Refuse, in one line, a lossy cache encoding (int8, top-k) that moves distill.loss's loss by
    over TOLERANCE. Dense float16, the default, is not measured: it is what every cached run has
    read (at most 1e-4 off in ``scripts/bench_cache_encodings.py``)."""
    d = cfg.distill
    encoding, top_k = choose_encoding(classes, d.cache_encoding, d.cache_top_k)
    if encoding == "float16":
        return
    method = method if method is not None else build_method(d)
    error = encoding_error(d, encoding, top_k, classes, method)
    if error > TOLERANCE:
        name = f"top-{top_k}" if encoding == "topk" else encoding
        raise ConfigError(
            f"distill.cache_encoding={name} changes distill.loss={d.loss}'s loss by {error:.1%} "
            f"(T={method.temperature}, {classes} classes, a confident teacher; tolerance "
            f"{TOLERANCE:.0%}): use distill.cache_encoding=float16 (exact; the default), or "
            "distill.teacher_cache=off")
