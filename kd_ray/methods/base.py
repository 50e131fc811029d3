"""The Distiller interface: a distillation method as an object (after timm's distillation task
and mdistiller's distillers).

A method says what it needs from the teacher (``teacher``: logits, named features, or nothing),
owns its trainable extras (submodules of the Distiller: ``TrainStep`` puts them in DDP with the
student, the optimizer trains them, checkpoints keep them), checks its own ``distill.params``
(its ``Params`` dataclass), and returns ``{"loss": ..., part: ...}`` from the labels, the
student's and the teacher's outputs and the epoch.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from torch import nn

from kd_ray.config.load import coerce_field
from kd_ray.errors import ConfigError
from kd_ray.registry import Registry

METHODS = Registry("loss")  # the config key is distill.loss
TEACHER_NEEDS = ("logits", "features", None)


@dataclass
class Outputs:
    """What a model gave for a batch: logits, and the outputs of the hooked layers by name."""
    logits: Optional[torch.Tensor]
    features: dict = field(default_factory=dict)


class Distiller(nn.Module):
    """Base class of distillation methods. Subclasses set the class attributes and ``forward``."""

    teacher: ClassVar[Optional[str]] = "logits"
    """"logits" (the teacher cache can serve it), "features" (a live teacher, with the outputs of
    ``teacher_layers``), or None (labels only: no teacher is loaded)."""
    Params: ClassVar[Optional[type]] = None
    """A dataclass of the method's settings, filled from ``distill.params`` and checked there."""
    default_temperature: ClassVar[Optional[float]] = None
    """The temperature used when ``distill.temperature`` is unset (None: the method uses none)."""
    needs_index: ClassVar[bool] = False
    """True: each batch carries its images' positions in the training set (``forward`` gets them
    as ``index=``, a LongTensor) and ``setup`` gets ``train_size=`` (how many positions), e.g. for
    a memory bank with one row per training image. Other methods get neither."""

    def __init__(self, cfg, params=None):
        super().__init__()
        self.cfg = cfg  # the distill config section: temperature, alpha, ...
        self.params = params

    @property
    def temperature(self) -> Optional[float]:
        """``distill.temperature``, or this method's default when it is unset."""
        return temperature_of(self.cfg, self.default_temperature)

    @property
    def student_layers(self) -> tuple:
        """Module paths of the student whose outputs reach ``forward`` as ``student.features``."""
        return ()

    @property
    def teacher_layers(self) -> tuple:
        """Module paths of the teacher whose outputs reach ``forward`` as ``teacher.features``."""
        return ()

    def setup(self, student: nn.Module, teacher: Optional[nn.Module], sample: torch.Tensor) -> None:
        """Build extras that depend on the models (e.g. a regressor sized by a layer's channels);
        called once per worker, before DDP, with a batch of one input image."""

    def forward(self, student: Outputs, teacher: Optional[Outputs], labels: torch.Tensor,
                epoch: int) -> dict:
        """The loss of one batch: ``{"loss": scalar, part: value, ...}``; every part is logged as
        ``train/<part>``. ``labels`` is -1 on unlabelled transfer images; ``epoch`` starts at 1;
        ``teacher`` is None for a method whose ``teacher`` is None."""
        raise NotImplementedError

    def loss(self, student_logits, teacher_logits, labels, epoch: int = 1) -> dict:
        """``forward`` for logits alone (tests, simple callers)."""
        teacher = None if teacher_logits is None else Outputs(teacher_logits)
        return self(Outputs(student_logits), teacher, labels, epoch)


def setup_method(method: Distiller, student, teacher, sample, train_size: int) -> None:
    """``method.setup``, with ``train_size=`` only for a method that ``needs_index`` (so every
    other method's, and every plugin's, ``setup(student, teacher, sample)`` stays as it is)."""
    extra = {"train_size": train_size} if method.needs_index else {}
    method.setup(student, teacher, sample, **extra)


def temperature_of(cfg, default: Optional[float] = 4.0) -> Optional[float]:
    """``cfg.temperature`` (a distill section) when set, else ``default``."""
    value = getattr(cfg, "temperature", None)
    return default if value is None else float(value)


class LossFunction(Distiller):
    """A plain loss ``fn(student_logits, teacher_logits, labels, cfg) -> dict`` as a method."""

    fn = None

    @classmethod
    def of(cls, fn, name: str) -> type:
        needs = "logits" if getattr(fn, "needs_teacher", True) else None
        return type(f"LossFunction[{name}]", (cls,), {"fn": staticmethod(fn), "teacher": needs})

    def forward(self, student, teacher, labels, epoch):
        return self.fn(student.logits, teacher.logits if teacher else None, labels, self.cfg)


def loss_method(fn, cfg=None) -> Distiller:
    """A method from a plain loss function (tests and scripts)."""
    return LossFunction.of(fn, getattr(fn, "__name__", "loss"))(cfg)


def method_class(name: str) -> type:
    """The Distiller class registered (or plugged in as ``pkg.module:attr``) under ``name``."""
    obj = METHODS.get(name)
    if isinstance(obj, type) and issubclass(obj, Distiller):
        if obj.teacher not in TEACHER_NEEDS:
            raise ConfigError(f"method {name!r}: teacher must be one of {TEACHER_NEEDS}, got {obj.teacher!r}")
        return obj
    if callable(obj) and not isinstance(obj, type):
        return LossFunction.of(obj, name)
    raise ConfigError(f"loss plugin {name!r} is not callable nor a kd_ray Distiller subclass")


def needs_teacher(name: str) -> bool:
    return method_class(name).teacher is not None


def check_params(cls: type, params: dict, name: str):
    """``distill.params`` as the method's Params dataclass; one-line errors name the valid keys."""
    if cls.Params is None:
        if params:
            raise ConfigError(f"distill.loss={name} takes no distill.params, got {sorted(params)}")
        return None
    valid = {f.name for f in dataclasses.fields(cls.Params)}
    bad = set(params) - valid
    if bad:
        raise ConfigError(f"unknown distill.params key(s) {sorted(bad)} for distill.loss={name}; "
                          f"valid keys: {', '.join(sorted(valid))}")
    values = {k: coerce_field(cls.Params, "distill.params", k, v) for k, v in params.items()}
    try:
        return cls.Params(**values)
    except (TypeError, ValueError) as exc:  # the method's own checks (in __post_init__)
        raise ConfigError(f"distill.params for distill.loss={name}: {exc}") from None


def build_method(distill_cfg, name: str | None = None) -> Distiller:
    """The method of ``distill.loss`` with its checked ``distill.params``, or the method ``name``
    with none (``ce`` for the teacher and baseline stages of a run that distils with a plugin)."""
    name = name or distill_cfg.loss
    cls = method_class(name)
    params = dict(distill_cfg.params or {}) if name == distill_cfg.loss else {}
    return cls(distill_cfg, check_params(cls, params, name))


def layer_names(model: nn.Module, depth: int = 2) -> list:
    """Module paths of ``model`` down to ``depth`` dots deep (what an error suggests)."""
    return [n for n, _ in model.named_modules() if n and n.count(".") < depth]


def missing_layer(model: nn.Module, name, role: str) -> ConfigError:
    """The error for a layer path the model does not have, naming the nearest paths it has."""
    names = [n for n, _ in model.named_modules() if n]
    near = difflib.get_close_matches(str(name), names, n=6, cutoff=0.5) or layer_names(model)[:12]
    return ConfigError(f"{role} layer {name!r} is not in {type(model).__name__}; nearest layer names: "
                       f"{', '.join(near)} (module paths as in model.named_modules())")


class FeatureTap:
    """Forward hooks that keep the outputs of named submodules during a forward pass."""

    def __init__(self, model: nn.Module, names):
        self.model, self.names, self.features, self._hooks = model, tuple(names), {}, []

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for name in self.names:
            if name not in modules:
                raise missing_layer(self.model, name, "a hooked")
            self._hooks.append(modules[name].register_forward_hook(self._keep(name)))
        return self

    def _keep(self, name):
        def hook(_module, _inputs, output):
            # A copy: a later in-place op (ReLU(inplace=True) after a BatchNorm) would change the
            # kept output, and break the student's backward pass.
            self.features[name] = output.clone() if isinstance(output, torch.Tensor) else output
        return hook

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def run_model(model: nn.Module, inputs: torch.Tensor, layers) -> Outputs:
    if not layers:
        return Outputs(model(inputs))
    with FeatureTap(model, layers) as tap:
        logits = model(inputs)
    return Outputs(logits, tap.features)


class TrainStep(nn.Module):
    """The student plus the method's trainable extras: the one module DDP wraps and the optimizer
    trains. The teacher is an argument, never a submodule: it stays frozen, unwrapped and out of
    the checkpoint."""

    def __init__(self, student: nn.Module, method: Distiller):
        super().__init__()
        self.student, self.method = student, method

    def forward(self, inputs, labels, epoch: int, teacher: Optional[nn.Module] = None,
                cached: Optional[torch.Tensor] = None, index: Optional[torch.Tensor] = None) -> dict:
        """``index``: the images' training-set positions, passed on (as ``index=``) only when given
        (batches carry them for a method that ``needs_index``)."""
        teacher_out = None
        if cached is not None:
            teacher_out = Outputs(cached)
        elif teacher is not None:
            with torch.no_grad():
                teacher_out = run_model(teacher, inputs, self.method.teacher_layers)
        student_out = run_model(self.student, inputs, self.method.student_layers)
        extra = {} if index is None else {"index": index}
        return self.method(student_out, teacher_out, labels, epoch, **extra)
