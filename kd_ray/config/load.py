"""The whole config: sections from YAML, the original project's args file and ``--set`` overrides.

Loading and checking need neither torch nor Ray: a bad key or value is refused in a fraction of
a second, before the CLI imports anything heavy.
"""
from __future__ import annotations

import dataclasses
from importlib import resources
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kd_ray.config.args_file import read_args_file
from kd_ray.storage import location
from kd_ray.config.sections import (PATH_KEYS, RUN_SECTIONS, DataConfig, DistillConfig, GuardConfig,
                                    ModelConfig, OptimConfig, RunConfig, scientific)
from kd_ray.config.sweep import SweepConfig
from kd_ray.errors import ConfigError, first_line

SECTIONS = {**RUN_SECTIONS, "sweep": SweepConfig}


def demo_config() -> Path:
    """The demo's config, shipped inside the package (``kd-ray demo`` works from any folder)."""
    return Path(str(resources.files("kd_ray").joinpath("configs", "demo.yaml")))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
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
            coerced = {k: coerce_field(section_cls, name, k, v) for k, v in values.items()}
            parts[name] = section_cls(**coerced)
        return cls(**parts)

    def save(self, path) -> None:
        path = location(path)  # a local file, or an object in run.storage
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def with_absolute_paths(self) -> "Config":
        """Workers run in another folder: make file paths absolute on the driver (URIs stay)."""
        changes: dict = {}
        for section, key in PATH_KEYS:
            value = getattr(getattr(self, section), key)
            if isinstance(value, list):  # an ensemble's teacher files
                changes.setdefault(section, {})[key] = [_absolute(v) for v in value]
            elif value:
                changes.setdefault(section, {})[key] = _absolute(value)
        return self.replace(**changes) if changes else self

    def replace(self, **sections: dict) -> "Config":
        """A copy with some fields changed: ``cfg.replace(run={"seed": 1})``."""
        raw = self.to_dict()
        for name, values in sections.items():
            raw[name].update(values)
        return Config.from_dict(raw)


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def coerce_field(section_cls, section: str, key: str, value: Any) -> Any:
    """Check ``value`` against a dataclass field's annotation; ints and text in scientific
    notation (``1e-3``, a string to YAML 1.1) are accepted for floats."""
    hints = typing.get_type_hints(section_cls)
    hint = hints[key]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{section}.{key} may not be null")
    if base is float:
        value = scientific(value)
    if (section, key) == ("distill", "teacher_weights") and isinstance(value, list):
        value = [scientific(v) for v in value]  # numbers, checked in DistillConfig
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if (section, key) == ("distill", "teacher_cache") and value is False:
        return "off"  # YAML 1.1 reads a bare `off` as false
    if (section, key) == ("run", "num_workers"):
        if isinstance(value, list):
            return value  # [min, max]: an elastic worker group (checked in RunConfig)
        base = int
    if (section, key) == ("distill", "teacher_path") and isinstance(value, (str, list)):
        return value  # one teacher file, or an ensemble's list (checked in DistillConfig)
    expected = typing.get_origin(base) or base
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(
            f"{section}.{key} must be {getattr(expected, '__name__', expected)}, got {value!r}"
        )
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings; values are parsed as YAML (``4``, ``true``, ``[1,2]``).

    ``section.key.name=value`` sets one entry of a mapping value (``distill.params.beta=2``).
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        section, name = parts[:2]
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: the value is not valid YAML: {yaml_problem(exc)}; fix it, "
                              "e.g. close its brackets or quotes, or quote the whole value") from None
        if len(parts) == 3:
            mapping = raw[section].setdefault(name, {})
            if not isinstance(mapping, dict):
                raise ConfigError(f"--set {key}: {section}.{name} is not a mapping")
            mapping[parts[2]] = value
        else:
            raw[section][name] = value
    return raw


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one phrase: what is wrong, where (its text runs to several lines)."""
    def where(mark) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    start = where(getattr(exc, "context_mark", None))  # e.g. where the unclosed bracket opened
    return f"{context + start + ': ' if context else ''}{problem}{where(getattr(exc, 'problem_mark', None))}"


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
        path = location(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; see configs/ for examples")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(exc)}; fix the "
                              "file (see configs/ for examples)") from None
        if raw is None:  # an empty file would silently train on every default
            raise ConfigError(f"config file {path} is empty: give it the sections you mean to set "
                              "(see configs/), or leave out -c to run on the defaults")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    if args_file is not None:
        raw = _merge(raw, read_args_file(args_file)[0])
    raw = apply_overrides(raw, list(overrides))
    return Config.from_dict(raw)
