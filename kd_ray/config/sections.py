"""Run configuration: dataclass sections, YAML files, ``--set section.key=value`` overrides.

Everything here is checked on the driver, before any Ray worker starts.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from kd_ray.args_file import read_args_file
from kd_ray.errors import ConfigError
from kd_ray.sweep_config import SweepConfig

STAGES = ("teacher", "student", "distill")


@dataclass
class DataConfig:
    name: str = "mnist5k"
    """Dataset registry name: imagefolder, parquet, mnist5k, digits, synthetic."""
    root: Optional[str] = None
    """Folder holding the splits (imagefolder: class folders; parquet: <split>.parquet)."""
    train_split: str = "train"
    val_split: str = "val"
    image_size: Optional[int] = None
    """Side in pixels fed to the model; None = the dataset's default (224 for image folders)."""
    num_classes: Optional[int] = None
    """If set, the dataset must have exactly this many classes."""
    labels_per_class: Optional[int] = None
    """Keep N labels per class for students; the rest is an unlabelled transfer set."""
    val_fraction: float = 0.2
    """Held-out fraction for datasets without a val split (mnist5k, digits)."""
    split_seed: int = 0
    augment: bool = False
    """Random crop + flip on training images."""
    loader_workers: int = 0
    synthetic_size: int = 512
    """Training images of the synthetic set (validation gets a quarter as many)."""

    def __post_init__(self):
        _positive(self, "image_size", allow_none=True)
        _positive(self, "num_classes", allow_none=True)
        _positive(self, "labels_per_class", allow_none=True)
        _positive(self, "synthetic_size")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.loader_workers < 0:
            raise ConfigError("data.loader_workers must be >= 0")


@dataclass
class ModelConfig:
    teacher: str = "cnn_teacher"
    """Teacher architecture (model registry name)."""
    student: str = "simple_cnn"
    """Student architecture (model registry name)."""
    teacher_pretrained: Optional[str] = None
    """Local weights file to start the teacher from (never downloaded)."""
    student_pretrained: Optional[str] = None


@dataclass
class DistillConfig:
    loss: str = "kd"
    """kd, mse_logits, ce, or a plugin 'package.module:function'."""
    temperature: float = 4.0
    alpha: float = 0.9
    """Weight of the distillation term; 1 - alpha goes to cross-entropy on labels."""
    teacher_path: Optional[str] = None
    """Exported teacher file (teacher.pt from train-teacher)."""
    teacher_cache: str = "auto"
    """auto (compute the teacher's logits once, keep them in <storage>/teacher_cache), off (run the
    teacher every step), or a folder from `kd-ray cache-teacher`."""
    cache_views: int = 4
    """Augmented views cached per image when data.augment is on (one per epoch, in turn)."""
    cache_top_k: Optional[int] = None
    """Store only the k largest logits and the others' total mass (for many classes)."""
    cache_batch_size: int = 256
    """Images per teacher forward pass while building the cache."""

    def __post_init__(self):
        _positive(self, "cache_views")
        _positive(self, "cache_top_k", allow_none=True)
        _positive(self, "cache_batch_size")
        if not self.teacher_cache:
            raise ConfigError("distill.teacher_cache must be auto, off or a folder")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature}")


@dataclass
class OptimConfig:
    name: str = "sgd"
    """sgd or adamw."""
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10
    teacher_epochs: Optional[int] = None
    """Epochs for the teacher stage; None = epochs."""
    batch_size: int = 64
    """Global batch size, split evenly over the Ray workers."""
    schedule: str = "cosine"
    """cosine, step or none (stepped every iteration)."""
    warmup_epochs: float = 0.0
    step_size: int = 30
    """Epochs between decays of the step schedule."""
    gamma: float = 0.1

    def __post_init__(self):
        if self.name not in ("sgd", "adamw"):
            raise ConfigError(f"optim.name must be sgd or adamw, got {self.name!r}")
        if self.schedule not in ("cosine", "step", "none"):
            raise ConfigError(f"optim.schedule must be cosine, step or none, got {self.schedule!r}")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        _positive(self, "epochs")
        _positive(self, "teacher_epochs", allow_none=True)
        _positive(self, "batch_size")
        if self.warmup_epochs < 0:
            raise ConfigError("optim.warmup_epochs must be >= 0")


@dataclass
class RunConfig:
    name: str = "kd"
    """Run name; a rerun with the same name resumes from its last checkpoint."""
    storage: str = "results"
    """Where runs are written: a local folder, or one every node mounts (NFS) for multi-node runs."""
    num_workers: int = 2
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1
    seed: int = 0
    seeds: list = field(default_factory=lambda: [0])
    """Seeds the pipeline runs the students with (mean and spread are reported)."""
    max_failures: int = 3
    """Worker-group restarts after a failure (a lost node, a killed worker), each from the last
    checkpoint (FailureConfig.max_failures; -1 = no limit). Errors no retry can fix stop at once."""
    collective_timeout_s: int = 600
    """Seconds a rank waits in a collective (gradient all-reduce, metric sums, the report barrier)
    before the attempt fails; must exceed the time rank 0 takes to write a checkpoint."""
    keep_checkpoints: int = 2
    """Newest epoch checkpoints kept per run (one is written every epoch)."""
    bf16: bool = True
    """bf16 autocast when training on GPU (ignored on CPU)."""
    channels_last: bool = True
    """NHWC memory layout for models and images on GPU (about 2x faster convolutions on H100/H200
    with bf16; ignored on CPU)."""
    ray_log_level: str = "WARNING"
    """Level of Ray Train's own console logs (INFO shows worker start-up and every report)."""
    dashboard_host: str = "127.0.0.1"
    """Where a local Ray instance's dashboard and job server listen (0.0.0.0 = every interface)."""

    def __post_init__(self):
        _positive(self, "num_workers")
        _positive(self, "threads_per_worker")
        _positive(self, "keep_checkpoints")
        _positive(self, "collective_timeout_s")
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise ConfigError(f"run.seeds must be a non-empty list of integers, got {self.seeds!r}")
        if self.max_failures < -1:
            raise ConfigError("run.max_failures must be >= -1 (-1 = retry forever)")
        if not self.name or "/" in self.name:
            raise ConfigError(f"run.name must be a non-empty name without '/', got {self.name!r}")


PATH_KEYS = [("data", "root"), ("model", "teacher_pretrained"), ("model", "student_pretrained"),
             ("distill", "teacher_path"), ("run", "storage")]

SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "distill": DistillConfig,
    "optim": OptimConfig,
    "run": RunConfig,
    "sweep": SweepConfig,
}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        if not isinstance(raw, dict):
            raise ConfigError("a config must be a mapping of sections: " + ", ".join(SECTIONS))
        unknown = set(raw) - set(SECTIONS)
        if unknown:
            raise ConfigError(
                f"unknown config section(s) {sorted(unknown)}; valid sections: {', '.join(SECTIONS)}"
            )
        parts = {}
        for name, section_cls in SECTIONS.items():
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"config section {name!r} must be a mapping")
            valid = {f.name for f in dataclasses.fields(section_cls)}
            bad = set(values) - valid
            if bad:
                raise ConfigError(
                    f"unknown key(s) {', '.join(f'{name}.{k}' for k in sorted(bad))}; "
                    f"valid keys in {name}: {', '.join(sorted(valid))}"
                )
            coerced = {k: _coerce(section_cls, name, k, v) for k, v in values.items()}
            parts[name] = section_cls(**coerced)
        return cls(**parts)

    def save(self, path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def with_absolute_paths(self) -> "Config":
        """Workers run in another folder: make file paths absolute on the driver (URIs stay)."""
        changes: dict = {}
        for section, key in PATH_KEYS:
            value = getattr(getattr(self, section), key)
            if value and "://" not in value:
                changes.setdefault(section, {})[key] = str(Path(value).expanduser().resolve())
        return self.replace(**changes) if changes else self

    def replace(self, **sections: dict) -> "Config":
        """A copy with some fields changed: ``cfg.replace(run={"seed": 1})``."""
        raw = self.to_dict()
        for name, values in sections.items():
            raw[name].update(values)
        return Config.from_dict(raw)


def _positive(obj, name: str, allow_none: bool = False) -> None:
    value = getattr(obj, name)
    if value is None and allow_none:
        return
    section = type(obj).__name__.replace("Config", "").lower()
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{section}.{name} must be a positive integer, got {value!r}")


def _coerce(section_cls, section: str, key: str, value: Any) -> Any:
    """Check ``value`` against the field's annotation; ints are accepted for floats."""
    hints = typing.get_type_hints(section_cls)
    hint = hints[key]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{section}.{key} may not be null")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if (section, key) == ("distill", "teacher_cache") and value is False:
        return "off"  # YAML 1.1 reads a bare `off` as false
    expected = typing.get_origin(base) or base
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(
            f"{section}.{key} must be {getattr(expected, '__name__', expected)}, got {value!r}"
        )
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings; values are parsed as YAML (``4``, ``true``, ``[1,2]``)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        section, name = parts
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        raw[section][name] = yaml.safe_load(text) if text.strip() else None
    return raw


def _merge(base: dict, extra: dict) -> dict:
    for section, values in extra.items():
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            base[section].update(values)
        else:
            base[section] = values
    return base


def load_config(path=None, overrides=(), args_file=None) -> Config:
    """YAML file (optional), then the args file (optional), then ``--set`` overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; see configs/ for examples")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    if args_file is not None:
        raw = _merge(raw, read_args_file(args_file)[0])
    raw = apply_overrides(raw, list(overrides))
    return Config.from_dict(raw)
