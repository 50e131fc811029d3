"""More logit methods: ``ctkd`` (curriculum temperature, Li et al., AAAI 2023) and ``mlkd``
(multi-level logit distillation, Jin et al., CVPR 2023). Written from the papers' equations (the
authors' code was not at hand); where a choice was not certain, the docstring says so. Both read
teacher logits only, so the teacher cache serves them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kd_ray.methods.base import METHODS, Distiller, temperature_of
from kd_ray.methods.logits import as_float, cross_entropy, non_negative, teacher_logits


def temperature(cfg) -> float:
    """distill.temperature, or 4 when it is unset (CTKD's starting temperature)."""
    return temperature_of(cfg, 4.0)


def kl_t2(s: torch.Tensor, t: torch.Tensor, temp) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the batch; ``temp`` a float or a tensor."""
    kl = F.kl_div(F.log_softmax(s / temp, dim=1), F.log_softmax(t / temp, dim=1),
                  reduction="batchmean", log_target=True)
    return kl * temp * temp


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient times -lambda backward (Ganin and Lempitsky)."""

    @staticmethod
    def forward(ctx, x, strength):
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.strength * grad, None


def cosine_lambda(epoch: int, loops: int, low: float, high: float) -> float:
    """CTKD's curriculum: low + (high - low) / 2 * (1 + cos((1 + min(n, loops) / loops) * pi)),
    from ``low`` at n = 0 up to ``high`` at n = loops (epochs; kd_ray counts from 1)."""
    if loops <= 0:
        return high
    n = min(epoch, loops)
    return low + 0.5 * (high - low) * (1 + math.cos((1 + n / loops) * math.pi))


@dataclass
class CTKDParams:
    t_min: float = 1.0
    """The learnt temperature is t_min + t_range * sigmoid(theta): always in (t_min, t_min + t_range)."""
    t_range: float = 20.0
    lambda_min: float = 0.0
    """The reversal strength's curriculum: from lambda_min (epoch 0) to lambda_max (epoch loops)."""
    lambda_max: float = 1.0
    loops: int = 10
    """Epochs over which lambda rises (the paper's E_loops)."""

    def __post_init__(self):
        non_negative(self, "t_range", "lambda_min", "lambda_max", "loops")
        if not self.t_min > 0:
            raise ValueError(f"t_min must be > 0, got {self.t_min}")


@METHODS.register("ctkd")
class CurriculumTemperatureKD(Distiller):
    """CTKD (Li et al., AAAI 2023): kd with a learnt global temperature T. The loss is
    alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE; T reaches the loss through a gradient
    reversal layer of strength lambda (cosine curriculum, ``cosine_lambda``), so the temperature
    *raises* the distillation loss while the student lowers it: the task gets harder as it goes.

    T = t_min + t_range * sigmoid(theta), theta a parameter of this Distiller (so DDP, the
    optimizer and the checkpoint carry it). Unsure against the authors' code: theta starts where
    T = distill.temperature (clamped into the range), and T^2 is part of the reversed term.
    """

    Params = CTKDParams
    default_temperature = 4.0  # where the learnt T starts

    def __init__(self, cfg, params=None):
        super().__init__(cfg, params)
        p = params or CTKDParams()
        start = min(max((temperature(cfg) - p.t_min) / max(p.t_range, 1e-12), 1e-4), 1 - 1e-4)
        self.theta = nn.Parameter(torch.tensor(math.log(start / (1 - start))))

    def current_temperature(self, strength: float) -> torch.Tensor:
        p = self.params or CTKDParams()
        return p.t_min + p.t_range * torch.sigmoid(GradientReversal.apply(self.theta, strength))

    def forward(self, student, teacher, labels, epoch):
        p = self.params or CTKDParams()
        s = as_float(student.logits)
        t = teacher_logits(s, teacher, "ctkd")
        strength = cosine_lambda(epoch, p.loops, p.lambda_min, p.lambda_max)
        temp = self.current_temperature(strength)
        kd = kl_t2(s, t, temp)
        ce = cross_entropy(s, labels)
        alpha = float(self.cfg.alpha)
        loss = alpha * kd + (1.0 - alpha) * ce
        return {"loss": loss, "kd": kd.detach(), "ce": ce.detach(), "temperature": temp.detach(),
                "lambda": torch.tensor(strength, device=s.device)}


@dataclass
class MLKDParams:
    temperatures: list = field(default_factory=lambda: [2.0, 3.0, 4.0, 5.0, 6.0])
    """The temperatures the three alignments are summed over (the paper's prediction augmentation)."""
    kd_weight: float = 1.0
    """Weight of the summed alignments."""
    ce_weight: float = 1.0
    """Weight of CE on the labelled items (distill.alpha is not used)."""

    def __post_init__(self):
        non_negative(self, "kd_weight", "ce_weight")
        if not self.temperatures or not all(isinstance(x, (int, float)) and x > 0 for x in self.temperatures):
            raise ValueError(f"temperatures must be a list of numbers > 0, got {self.temperatures!r}")
        self.temperatures = [float(x) for x in self.temperatures]


def batch_alignment(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """|| P_t P_t^T - P_s P_s^T ||^2 / B: the items' B x B similarity (Gram) matrices."""
    return (p_t @ p_t.t() - p_s @ p_s.t()).pow(2).sum() / p_s.shape[0]


def class_alignment(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """|| P_t^T P_t - P_s^T P_s ||^2 / C: the classes' C x C correlation matrices."""
    return (p_t.t() @ p_t - p_s.t() @ p_s).pow(2).sum() / p_s.shape[1]


@METHODS.register("mlkd")
class MultiLevelKD(Distiller):
    """MLKD (Jin et al., CVPR 2023): ce_weight * CE + kd_weight * sum over temperatures T of
    [T^2 KL(p_t^T || p_s^T) (instance) + batch alignment + class alignment], p^T = softmax(z / T).

    Views: the authors align a weak and a strong augmentation of each image. kd_ray serves one view
    per image per epoch (the teacher cache holds the teacher's logits of that view), so MLKD here
    aligns over temperatures and the three levels on that one view. Not done, unsure of the exact
    rule without the authors' code: their confidence mask (teacher predictions below a batch
    percentile left out of some terms).
    """

    Params = MLKDParams

    def forward(self, student, teacher, labels, epoch):
        p = self.params or MLKDParams()
        s = as_float(student.logits)
        t = teacher_logits(s, teacher, "mlkd")
        inst = bat = cls = 0.0
        for temp in p.temperatures:
            p_s, p_t = F.softmax(s / temp, dim=1), F.softmax(t / temp, dim=1)
            inst = inst + kl_t2(s, t, temp)
            bat = bat + batch_alignment(p_s, p_t)
            cls = cls + class_alignment(p_s, p_t)
        ce = cross_entropy(s, labels)
        loss = p.ce_weight * ce + p.kd_weight * (inst + bat + cls)
        return {"loss": loss, "instance": inst.detach(), "batch": bat.detach(), "class": cls.detach(),
                "ce": ce.detach()}
