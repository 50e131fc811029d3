"""Plugins used by the tests: losses ("tests.plugins:my_loss"), a Distiller with its own params
and a trainable head ("tests.plugins:HeadedMSE"), a model and a dataset."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kd_ray.data import Source
from kd_ray.methods import Distiller
from kd_ray.methods.logits import cross_entropy


def my_loss(student_logits, teacher_logits, labels, cfg):
    """Squared distance between logits (a toy custom distillation loss)."""
    diff = (student_logits - teacher_logits.detach()).pow(2).mean()
    return {"loss": diff, "sq": diff.detach()}


def no_teacher_loss(student_logits, teacher_logits, labels, cfg):
    return {"loss": student_logits.sum() * 0}


no_teacher_loss.needs_teacher = False

not_callable = 3


_calls = {"n": 0}


def nan_in_second_epoch(student_logits, teacher_logits, labels, cfg):
    """Cross-entropy for 4 steps (one epoch in the Ray test), then NaN: a diverging run."""
    _calls["n"] += 1
    loss = F.cross_entropy(student_logits, labels)
    if _calls["n"] > 4:
        loss = loss * float("nan")
    return {"loss": loss}


nan_in_second_epoch.needs_teacher = False


def pull_to_class_zero(student_logits, teacher_logits, labels, cfg):
    """A planted collapse: every image is pushed to class 0 (the guard's one-class rule)."""
    return {"loss": F.cross_entropy(student_logits, torch.zeros_like(labels).clamp(min=0))}


pull_to_class_zero.needs_teacher = False


@dataclass
class HeadParams:
    weight: float = 0.5
    """Weight of the MSE between head(student logits) and the teacher's logits; the rest is CE."""

    def __post_init__(self):
        if not 0 <= self.weight <= 1:
            raise ValueError(f"weight must be in [0, 1], got {self.weight}")


class HeadedMSE(Distiller):
    """A toy method with a trainable head, sized in setup() from the student's output. Its buffer
    ``steps`` counts the training steps the head has seen, so a test can tell a head restored
    from a checkpoint from a fresh one."""

    teacher = "logits"
    Params = HeadParams

    def setup(self, student, teacher, sample):
        was = student.training
        with torch.no_grad():
            classes = student.eval()(sample).shape[1]
        student.train(was)
        self.head = nn.Linear(classes, classes)
        nn.init.eye_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, student, teacher, labels, epoch):
        if self.training:
            self.steps += 1
        s = student.logits.float()
        mse = F.mse_loss(self.head(s), teacher.logits.float())
        ce = cross_entropy(s, labels)
        loss = self.params.weight * mse + (1 - self.params.weight) * ce
        return {"loss": loss, "mse": mse.detach(), "ce": ce.detach()}


class FeatureMatch(Distiller):
    """Reads named layers of both models (a FitNets-like shape, for the interface tests)."""

    teacher = "features"

    @property
    def student_layers(self):
        return ("0",)

    @property
    def teacher_layers(self):
        return ("0",)

    def forward(self, student, teacher, labels, epoch):
        s, t = student.features["0"], teacher.features["0"]
        loss = F.mse_loss(s, t)
        return {"loss": loss, "hint": loss.detach()}


class BadTeacherKind(Distiller):
    teacher = "probabilities"


def linear_model(num_classes):
    """A model plugin ("tests.plugins:linear_model")."""
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))


def two_blobs(cfg):
    """A dataset plugin ("tests.plugins:two_blobs"): two classes of 8x8 images, bright or dark."""
    from kd_ray.data.sources import TensorImages

    g = torch.Generator().manual_seed(cfg.split_seed)
    images = torch.rand(40, 3, 8, 8, generator=g) * 0.5 + (torch.arange(40) % 2).view(-1, 1, 1, 1) * 0.5
    labels = (torch.arange(40) % 2).tolist()
    return Source(["dark", "bright"], labels[:32], labels[32:], 8, False,
                  lambda size: (TensorImages(images[:32], labels[:32], 1.0),
                                TensorImages(images[32:], labels[32:], 1.0)))
