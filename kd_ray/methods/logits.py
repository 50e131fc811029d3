"""Methods over logits: ``ce`` (labels only), ``kd`` (Hinton et al.), ``mse_logits`` (the original
project's loss), ``dkd`` (decoupled KD) and ``dist`` (DIST). The teacher cache can serve every
method here.

``labels`` is int64 with -1 marking an unlabelled image (transfer set). "loss" carries the graph;
the other entries are detached scalars for logging.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd_ray.errors import ConfigError
from kd_ray.methods.base import METHODS, Distiller, temperature_of


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


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-scored logits per item (Sun et al., CVPR 2024): the student matches the teacher's logit
    *relations*, not their range. Unbiased std and eps as in the authors' code."""
    return (logits - logits.mean(dim=1, keepdim=True)) / (eps + logits.std(dim=1, keepdim=True))


def soft_kl(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the batch. T^2 keeps the soft-target
    gradients at the same scale whatever T is (Hinton et al.)."""
    kl = F.kl_div(F.log_softmax(s / temp, dim=1), F.log_softmax(t / temp, dim=1),
                  reduction="batchmean", log_target=True)
    return kl * temp * temp


def hinton_kd(student, teacher, labels, cfg, name: str = "kd", std: bool = False) -> dict:
    """alpha * T^2 * KL over all items + (1 - alpha) * CE over labelled ones (also the logit term
    of the feature methods). T: distill.temperature, else 4 (2 with ``std``, the authors' value)."""
    s = as_float(student.logits)
    t = teacher_logits(s, teacher, name)
    temp, alpha = temperature_of(cfg, 2.0 if std else 4.0), float(cfg.alpha)
    kd = soft_kl(standardize(s), standardize(t), temp) if std else soft_kl(s, t, temp)
    ce = cross_entropy(s, labels)
    loss = alpha * kd + (1.0 - alpha) * ce
    return {"loss": loss, "kd": kd.detach(), "ce": ce.detach()}


@dataclass
class KDParams:
    standardize: bool = False
    """Z-score each item's logits before softening (logit standardisation, Sun et al. CVPR 2024);
    the authors pair it with a lower temperature (2) and a heavier KD weight."""


@METHODS.register("kd")
class HintonKD(Distiller):
    """alpha * T^2 * KL(p_t || p_s) over all items + (1 - alpha) * CE over labelled ones."""

    Params = KDParams
    default_temperature = 4.0

    @property
    def temperature(self):
        return temperature_of(self.cfg, 2.0 if self.params and self.params.standardize else 4.0)

    def forward(self, student, teacher, labels, epoch):
        return hinton_kd(student, teacher, labels, self.cfg, "kd", bool(self.params and self.params.standardize))


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


def targets(labels: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The labels, with the teacher's argmax standing in where an item has none (-1)."""
    return torch.where(labels >= 0, labels, t.argmax(dim=1))


def non_negative(obj, *names) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(obj, name)}")


@dataclass
class DKDParams:
    alpha: float = 1.0
    """Weight of TCKD, the target-vs-rest KL (binary: p(target), 1 - p(target))."""
    beta: float = 8.0
    """Weight of NCKD, the KL between the distributions over the non-target classes."""
    warmup: int = 3
    """Epochs over which the DKD term ramps up linearly (weight min(epoch / warmup, 1)); 0 = none.
    mdistiller uses 20 of 240 epochs; 3 suits runs of 10-30 epochs."""
    ce_weight: float = 1.0
    """Weight of CE on the labelled items (DKD's own: distill.alpha is not used)."""
    standardize: bool = False
    """Z-score logits before softening (Sun et al., CVPR 2024)."""

    def __post_init__(self):
        non_negative(self, "alpha", "beta", "warmup", "ce_weight")


def dkd_terms(s: torch.Tensor, t: torch.Tensor, target: torch.Tensor, temp: float):
    """(TCKD, NCKD) of Zhao et al. CVPR 2022, each T^2 * KL, mean over the batch."""
    gt = F.one_hot(target, s.shape[1]).bool()
    p_s, p_t = F.softmax(s / temp, dim=1), F.softmax(t / temp, dim=1)
    # Binary distributions [p(target), p(rest)]; clamp keeps log finite when p rounds to 0 or 1.
    b_s = torch.stack([p_s[gt], (p_s * ~gt).sum(1)], dim=1).clamp_min(1e-12)
    b_t = torch.stack([p_t[gt], (p_t * ~gt).sum(1)], dim=1).clamp_min(1e-12)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean() * temp * temp
    # Non-target distributions: softmax over the C - 1 other classes of each item.
    rest_s = s.masked_select(~gt).view(s.shape[0], -1)
    rest_t = t.masked_select(~gt).view(t.shape[0], -1)
    nckd = soft_kl(rest_s, rest_t, temp)
    return tckd, nckd


@METHODS.register("dkd")
class DecoupledKD(Distiller):
    """Decoupled KD (Zhao et al., CVPR 2022): ce_weight * CE + min(epoch / warmup, 1) *
    (alpha * TCKD + beta * NCKD). On an unlabelled item the target class is the teacher's argmax."""

    Params = DKDParams
    default_temperature = 4.0

    def forward(self, student, teacher, labels, epoch):
        p = self.params or DKDParams()
        s = as_float(student.logits)
        t = teacher_logits(s, teacher, "dkd")
        target = targets(labels, t)
        if p.standardize:
            s_soft, t_soft = standardize(s), standardize(t)
        else:
            s_soft, t_soft = s, t
        tckd, nckd = dkd_terms(s_soft, t_soft, target, self.temperature)
        warm = min(epoch / p.warmup, 1.0) if p.warmup else 1.0
        ce = cross_entropy(s, labels)
        loss = p.ce_weight * ce + warm * (p.alpha * tckd + p.beta * nckd)
        return {"loss": loss, "tckd": tckd.detach(), "nckd": nckd.detach(), "ce": ce.detach()}


@dataclass
class DISTParams:
    beta: float = 1.0
    """Weight of the inter-class relation (per item: Pearson correlation over classes)."""
    gamma: float = 1.0
    """Weight of the intra-class relation (per class: Pearson correlation over the batch)."""
    ce_weight: float = 1.0
    """Weight of CE on the labelled items (distill.alpha is not used)."""

    def __post_init__(self):
        non_negative(self, "beta", "gamma", "ce_weight")


def pearson_loss(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - mean over rows of the Pearson correlation of a's and b's rows (DIST's relation loss)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return 1.0 - corr.mean()


@METHODS.register("dist")
class DIST(Distiller):
    """DIST (Huang et al., NeurIPS 2022): ce_weight * CE + T^2 * (beta * inter + gamma * intra),
    correlations of softmax(logits / T) across classes (inter) and across the batch (intra)."""

    Params = DISTParams
    default_temperature = 4.0

    def forward(self, student, teacher, labels, epoch):
        p = self.params or DISTParams()
        s = as_float(student.logits)
        t = teacher_logits(s, teacher, "dist")
        temp = self.temperature
        y_s, y_t = F.softmax(s / temp, dim=1), F.softmax(t / temp, dim=1)
        inter = pearson_loss(y_s, y_t) * temp * temp
        intra = pearson_loss(y_s.t(), y_t.t()) * temp * temp
        ce = cross_entropy(s, labels)
        loss = p.ce_weight * ce + p.beta * inter + p.gamma * intra
        return {"loss": loss, "inter": inter.detach(), "intra": intra.detach(), "ce": ce.detach()}
