"""Methods over logits: ``ce`` (labels only), ``kd`` (Hinton et al.), ``mse_logits`` (the original
project's loss). The teacher cache can serve every method here.

``labels`` is int64 with -1 marking an unlabelled image (transfer set). "loss" carries the graph;
the other entries are detached scalars for logging.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_ray.errors import ConfigError
from kd_ray.methods.base import METHODS, Distiller


def as_float(x: torch.Tensor) -> torch.Tensor:
    # Softmax/log in bf16/fp16 loses too much; float64 (gradcheck) is kept as is.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def teacher_logits(student: torch.Tensor, teacher, name: str) -> torch.Tensor:
    if teacher is None or teacher.logits is None:
        raise ConfigError(f"loss {name!r} needs teacher logits; set distill.teacher_path")
    logits = teacher.logits
    if logits.shape != student.shape:
        raise ConfigError(
            f"loss {name!r}: student logits {tuple(student.shape)} and teacher logits "
            f"{tuple(logits.shape)} differ (the models must have the same classes)"
        )
    # The teacher is frozen: no gradient flows into it.
    return logits.detach().to(student.dtype)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over labelled items (label -1 ignored).

    Sum / count instead of mean: a batch without labels gives 0 (not NaN) that is still
    connected to the graph, so DDP ranks keep in step, and there is no host sync.
    """
    total = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum")
    return total / (labels >= 0).sum().clamp(min=1)


@METHODS.register("ce")
class CrossEntropy(Distiller):
    """Labels only: the teacher stage and the baseline student."""

    teacher = None

    def forward(self, student, teacher, labels, epoch):
        ce = cross_entropy(as_float(student.logits), labels)
        return {"loss": ce, "ce": ce.detach()}


@METHODS.register("kd")
class HintonKD(Distiller):
    """alpha * T^2 * KL(p_t || p_s) over all items + (1 - alpha) * CE over labelled ones."""

    def forward(self, student, teacher, labels, epoch):
        s = as_float(student.logits)
        t = teacher_logits(s, teacher, "kd")
        temp, alpha = float(self.cfg.temperature), float(self.cfg.alpha)
        kl = F.kl_div(F.log_softmax(s / temp, dim=1), F.log_softmax(t / temp, dim=1),
                      reduction="batchmean", log_target=True)
        # T^2 keeps the soft-target gradients at the same scale whatever T is.
        kd = kl * temp * temp
        ce = cross_entropy(s, labels)
        loss = alpha * kd + (1.0 - alpha) * ce
        return {"loss": loss, "kd": kd.detach(), "ce": ce.detach()}


@METHODS.register("mse_logits")
class MSELogits(Distiller):
    """The original project's MSE between logits, mixed with CE on labelled items."""

    def forward(self, student, teacher, labels, epoch):
        s = as_float(student.logits)
        t = teacher_logits(s, teacher, "mse_logits")
        mse = F.mse_loss(s, t)
        ce = cross_entropy(s, labels)
        alpha = float(self.cfg.alpha)
        loss = alpha * mse + (1.0 - alpha) * ce
        return {"loss": loss, "mse": mse.detach(), "ce": ce.detach()}
