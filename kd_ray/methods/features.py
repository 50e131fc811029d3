"""Feature methods: ``fitnets`` (Romero et al., ICLR 2015) and ``at`` (attention transfer,
Zagoruyko and Komodakis, ICLR 2017). They read named layers of both models, so the teacher runs
live (the logit cache cannot serve them). Both add their feature term to the ``kd`` loss of the
distill section (``distill.alpha: 0`` leaves CE + the feature term, as in the papers' CE
variants).

Layers are module paths (``layer3``, ``features.denseblock3``, ``4`` in an nn.Sequential).
``setup`` checks them and their shapes on one image: the driver calls it before Ray starts, so a
bad name or an unmappable shape is a one-line error there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kd_ray.errors import ConfigError
from kd_ray.methods.base import METHODS, Distiller, layer_names, missing_layer, run_model
from kd_ray.methods.logits import as_float, hinton_kd, non_negative


def check_layers(model: nn.Module, names, role: str) -> None:
    modules = dict(model.named_modules())
    for name in names:
        if not name or name not in modules:
            raise missing_layer(model, name, role)


@torch.no_grad()
def shapes(model: nn.Module, sample: torch.Tensor, names=None) -> dict:
    """Output shape (without the batch) of each named layer (all layers if ``names`` is None) on
    one image, in eval mode (BatchNorm cannot train on one image); the model's mode is restored."""
    modules = [(n, m) for n, m in model.named_modules() if n and (names is None or n in names)]
    found, hooks = {}, []
    for name, module in modules:
        def keep(_m, _i, out, name=name):
            if isinstance(out, torch.Tensor):
                found.setdefault(name, tuple(out.shape[1:]))
        hooks.append(module.register_forward_hook(keep))
    was = model.training
    try:
        model.eval()(sample)
    finally:
        model.train(was)
        for hook in hooks:
            hook.remove()
    return found


def fmt(shape: tuple) -> str:
    return "x".join(map(str, shape)) if shape else "a scalar"


def layers_at(model: nn.Module, sample: torch.Tensor, spatial: tuple) -> str:
    """Up to 6 of the model's layers whose 4-D output has the spatial size ``spatial`` (shallow
    paths first): what an error suggests instead."""
    same = [n for n, s in shapes(model, sample).items() if len(s) == 3 and s[1:] == spatial]
    same.sort(key=lambda n: n.count("."))  # shallow first, then in module order
    return ", ".join(same[:6]) or "none"


def hooked(outputs, name: str, method: str, role: str) -> torch.Tensor:
    if outputs is None or name not in outputs.features:
        raise ConfigError(f"{method} needs the {role}'s layer {name!r}: the teacher runs live for feature "
                          "methods (not from the teacher cache)")
    return as_float(outputs.features[name])


@dataclass
class FitNetsParams:
    student_layer: Optional[str] = None
    """Student module path whose output is regressed onto the teacher's (e.g. layer3)."""
    teacher_layer: Optional[str] = None
    """Teacher module path: the hint. The same spatial size as the student's layer, half or twice
    it, or smaller (see ``conv_reg``)."""
    weight: float = 1.0
    """Weight of the hint loss (MSE between regressor(student feature) and teacher feature)."""

    def __post_init__(self):
        non_negative(self, "weight")


def conv_reg(s: tuple, t: tuple) -> Optional[nn.Module]:
    """mdistiller's ``ConvReg`` from a (C, H, W) student map to a (C', H', W') teacher map: a conv
    then BatchNorm2d and ReLU (teacher hint layers are block outputs, after a ReLU). The conv: 3x3
    stride 2 for a student map twice the teacher's size, a 4x4 stride-2 transposed conv for one
    half its size, else a valid conv of kernel (1 + H - H', 1 + W - W') (1x1 at equal size); None
    (refused) for any other smaller student map."""
    (sc, sh, sw), (tc, th, tw) = s, t
    if (sh, sw) == (2 * th, 2 * tw):
        conv = nn.Conv2d(sc, tc, kernel_size=3, stride=2, padding=1)
    elif (2 * sh, 2 * sw) == (th, tw):
        conv = nn.ConvTranspose2d(sc, tc, kernel_size=4, stride=2, padding=1)
    elif sh >= th and sw >= tw:
        conv = nn.Conv2d(sc, tc, kernel_size=(1 + sh - th, 1 + sw - tw))
    else:
        return None
    return nn.Sequential(conv, nn.BatchNorm2d(tc), nn.ReLU())


class OneLayer(Distiller):
    """A feature method over one student and one teacher layer (``distill.params.student_layer``,
    ``teacher_layer``)."""

    teacher = "features"
    default_temperature = 4.0  # of its kd term

    @property
    def student_layers(self):
        return (self.params.student_layer,)

    @property
    def teacher_layers(self):
        return (self.params.teacher_layer,)


@METHODS.register("fitnets")
class FitNets(OneLayer):
    """kd + weight * MSE(regressor(student layer), teacher layer). The regressor is mdistiller's
    ConvReg (``conv_reg``: a conv sized to the two maps, BatchNorm2d, ReLU) for (C, H, W) outputs,
    a Linear for (B, C) ones; it trains with the student."""

    Params = FitNetsParams

    def setup(self, student, teacher, sample):
        p = self.params
        if not (p.student_layer and p.teacher_layer):
            raise ConfigError(
                "fitnets needs distill.params.student_layer and distill.params.teacher_layer (module "
                f"paths); student layers: {', '.join(layer_names(student)[:10])}; teacher layers: "
                f"{', '.join(layer_names(teacher)[:10])}")
        check_layers(student, [p.student_layer], "student")
        check_layers(teacher, [p.teacher_layer], "teacher")
        s = shapes(student, sample, [p.student_layer])[p.student_layer]
        t = shapes(teacher, sample, [p.teacher_layer])[p.teacher_layer]
        regressor = None
        if len(s) == len(t) == 3:
            regressor = conv_reg(s, t)
        elif len(s) == len(t) == 1:
            regressor = nn.Linear(s[0], t[0])
        if regressor is None:
            where = (f"; teacher layers at {fmt(s[1:])}: {layers_at(teacher, sample, s[1:])}"
                     if len(s) == 3 else "")
            raise ConfigError(
                f"fitnets cannot map student layer {p.student_layer!r} ({fmt(s)}) onto teacher layer "
                f"{p.teacher_layer!r} ({fmt(t)}): the regressor maps a (C, H, W) map onto one of the "
                f"same, half or twice its size, or any smaller size (or a (B, C) vector onto one); "
                f"pick another distill.params.teacher_layer or student_layer{where}")
        self.regressor = regressor

    def forward(self, student, teacher, labels, epoch):
        p = self.params
        s = hooked(student, p.student_layer, "fitnets", "student")
        t = hooked(teacher, p.teacher_layer, "fitnets", "teacher").detach()
        hint = F.mse_loss(as_float(self.regressor(s)), t)
        parts = hinton_kd(student, teacher, labels, self.cfg, "fitnets")
        parts["loss"] = parts["loss"] + p.weight * hint
        return {**parts, "hint": hint.detach()}


def attention(feature: torch.Tensor) -> torch.Tensor:
    """Spatial attention map of a (B, C, H, W) feature: mean over channels of |a|^2 (p = 2),
    flattened and L2-normalised per item (Zagoruyko and Komodakis's code)."""
    return F.normalize(feature.pow(2).mean(1).flatten(1))


def at_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mean((Q_s - Q_t)^2) of one pair; maps of different H x W are first average-pooled to the
    smaller size (as mdistiller does), each side that is larger."""
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    if tuple(s.shape[2:]) != size:
        s = F.adaptive_avg_pool2d(s, size)
    if tuple(t.shape[2:]) != size:
        t = F.adaptive_avg_pool2d(t, size)
    return (attention(s) - attention(t)).pow(2).mean()


@dataclass
class ATParams:
    student_layers: list = field(default_factory=list)
    """Student module paths, one per pair (e.g. [layer2, layer3])."""
    teacher_layers: list = field(default_factory=list)
    """Teacher module paths, pairwise with student_layers; empty: the same paths."""
    beta: float = 1000.0
    """Weight: the loss adds beta * the sum over pairs of mean((Q_s - Q_t)^2), Q the normalised
    attention maps (the authors' code and mdistiller; 1000 as in the paper)."""

    def __post_init__(self):
        non_negative(self, "beta")
        check_layer_lists(self)


def check_layer_lists(params) -> None:
    """``params.student_layers`` / ``teacher_layers`` as lists of module paths that pair up."""
    for key in ("student_layers", "teacher_layers"):
        names = getattr(params, key)
        # YAML reads nn.Sequential paths ([1, 4]) as ints.
        if not all((isinstance(n, str) and n) or (type(n) is int and n >= 0) for n in names):
            raise ValueError(f"{key} must be a list of module paths, got {names!r}")
        setattr(params, key, [str(n) for n in names])
    if params.teacher_layers and len(params.teacher_layers) != len(params.student_layers):
        raise ValueError(f"teacher_layers ({len(params.teacher_layers)}) and student_layers "
                         f"({len(params.student_layers)}) must pair up one to one")


class LayerPairs(Distiller):
    """A feature method over pairs of layers: ``distill.params.student_layers`` and
    ``teacher_layers`` (default: the same paths). ``layer_shapes`` checks the names and returns
    each pair's output shapes on one image (what ``setup`` builds its extras from)."""

    teacher = "features"
    default_temperature = 4.0  # of its kd term
    layout_hint = "a list of module paths"

    @property
    def student_layers(self):
        return tuple(self.params.student_layers)

    @property
    def teacher_layers(self):
        return tuple(self.params.teacher_layers or self.params.student_layers)

    def layer_shapes(self, name: str, student, teacher, sample) -> list[tuple]:
        """[(student layer, teacher layer, student shape, teacher shape)] per pair."""
        if not self.student_layers:
            raise ConfigError(
                f"{name} needs distill.params.student_layers ({self.layout_hint}; teacher_layers "
                f"defaults to the same paths); student layers: {', '.join(layer_names(student)[:10])}")
        check_layers(student, self.student_layers, "student")
        check_layers(teacher, self.teacher_layers, "teacher")
        s_shapes = shapes(student, sample, self.student_layers)
        t_shapes = shapes(teacher, sample, self.teacher_layers)
        return [(s, t, s_shapes[s], t_shapes[t]) for s, t in zip(self.student_layers, self.teacher_layers)]


@METHODS.register("at")
class AttentionTransfer(LayerPairs):
    """kd + beta * sum over layer pairs of the attention-map distance (maps of different spatial
    size are pooled to the smaller one)."""

    Params = ATParams

    def setup(self, student, teacher, sample):
        for s_name, t_name, s, t in self.layer_shapes("at", student, teacher, sample):
            if len(s) != 3 or len(t) != 3:
                where = (f"; teacher layers at {fmt(s[1:])}: {layers_at(teacher, sample, s[1:])}"
                         if len(s) == 3 else "")
                raise ConfigError(
                    f"at cannot compare student layer {s_name!r} ({fmt(s)}) with teacher layer "
                    f"{t_name!r} ({fmt(t)}): attention maps need (C, H, W) outputs; "
                    f"pick other distill.params.student_layers / teacher_layers{where}")

    def forward(self, student, teacher, labels, epoch):
        total = 0.0
        for s_name, t_name in zip(self.student_layers, self.teacher_layers):
            s = hooked(student, s_name, "at", "student")
            t = hooked(teacher, t_name, "at", "teacher").detach()
            total = total + at_loss(s, t)
        parts = hinton_kd(student, teacher, labels, self.cfg, "at")
        parts["loss"] = parts["loss"] + self.params.beta * total
        return {**parts, "at": total.detach()}
