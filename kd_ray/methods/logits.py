"""Distillation losses: ``fn(student_logits, teacher_logits, labels, cfg) -> {"loss": ..., parts}``.

``labels`` is int64 with -1 marking an unlabelled image (transfer set). "loss" carries the graph;
the other entries are detached scalars for logging.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from kd_ray.errors import ConfigError
from kd_ray.registry import Registry, import_object


class LossSpec(NamedTuple):
    fn: Callable
    needs_teacher: bool


LOSSES = Registry("loss")


def _register(name: str, needs_teacher: bool):
    def add(fn):
        LOSSES.register(name, LossSpec(fn, needs_teacher))
        return fn

    return add


def get_loss(name: str) -> tuple[Callable, bool]:
    """Return (fn, needs_teacher); ``package.module:function`` loads a user plugin."""
    if ":" in name:
        fn = import_object(name)
        if not callable(fn):
            raise ConfigError(f"loss plugin {name!r} is not callable")
        # Plugins are assumed to need a teacher unless they set fn.needs_teacher = False.
        return fn, bool(getattr(fn, "needs_teacher", True))
    spec = LOSSES.get(name)
    return spec.fn, spec.needs_teacher


def _as_float(x: torch.Tensor) -> torch.Tensor:
    # Softmax/log in bf16/fp16 loses too much; float64 (gradcheck) is kept as is.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _teacher(student: torch.Tensor, teacher, name: str) -> torch.Tensor:
    if teacher is None:
        raise ConfigError(f"loss {name!r} needs teacher logits; set distill.teacher_path")
    if teacher.shape != student.shape:
        raise ConfigError(
            f"loss {name!r}: student logits {tuple(student.shape)} and teacher logits "
            f"{tuple(teacher.shape)} differ (the models must have the same classes)"
        )
    # The teacher is frozen: no gradient flows into it.
    return teacher.detach().to(student.dtype)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over labelled items (label -1 ignored).

    Sum / count instead of mean: a batch without labels gives 0 (not NaN) that is still
    connected to the graph, so DDP ranks keep in step, and there is no host sync.
    """
    total = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum")
    return total / (labels >= 0).sum().clamp(min=1)


@_register("ce", needs_teacher=False)
def ce_loss(student_logits, teacher_logits, labels, cfg) -> dict:
    ce = cross_entropy(_as_float(student_logits), labels)
    return {"loss": ce, "ce": ce.detach()}


@_register("kd", needs_teacher=True)
def kd_loss(student_logits, teacher_logits, labels, cfg) -> dict:
    """Hinton et al.: alpha * T^2 * KL(p_t || p_s) over all items + (1 - alpha) * CE."""
    s = _as_float(student_logits)
    t = _teacher(s, teacher_logits, "kd")
    temp, alpha = float(cfg.temperature), float(cfg.alpha)
    kl = F.kl_div(F.log_softmax(s / temp, dim=1), F.log_softmax(t / temp, dim=1),
                  reduction="batchmean", log_target=True)
    # T^2 keeps the soft-target gradients at the same scale whatever T is.
    kd = kl * temp * temp
    ce = cross_entropy(s, labels)
    loss = alpha * kd + (1.0 - alpha) * ce
    return {"loss": loss, "kd": kd.detach(), "ce": ce.detach()}


@_register("mse_logits", needs_teacher=True)
def mse_logits_loss(student_logits, teacher_logits, labels, cfg) -> dict:
    """The original project's MSE between logits, mixed with CE on labelled items."""
    s = _as_float(student_logits)
    t = _teacher(s, teacher_logits, "mse_logits")
    mse = F.mse_loss(s, t)
    ce = cross_entropy(s, labels)
    alpha = float(cfg.alpha)
    loss = alpha * mse + (1.0 - alpha) * ce
    return {"loss": loss, "mse": mse.detach(), "ce": ce.detach()}
