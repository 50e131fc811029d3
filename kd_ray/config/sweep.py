"""The ``sweep`` section of a config: what ``kd-ray tune`` searches and how (checked on the driver)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kd_ray.config.sections import RUN_SECTIONS, positive, scientific
from kd_ray.errors import ConfigError

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass
class SweepConfig:
    space: dict = field(default_factory=dict)
    """What `kd-ray tune` searches: "section.key" -> a list (a grid), or one of
    {grid: [..]}, {choice: [..]}, {uniform: [low, high]}, {loguniform: [low, high]},
    {randint: [low, high]}."""
    num_samples: int = 1
    """Trials drawn (random, optuna); with grid keys, how often the whole grid is run."""
    search: str = "random"
    """random (Tune's grid + random variant generator) or optuna (TPE; pip install optuna)."""
    scheduler: str = "asha"
    """asha (stops weak trials after grace_period epochs) or none."""
    grace_period: int = 1
    """Epochs every trial trains before ASHA may stop it; at least the learning-rate warm-up plus
    one (optim.warmup_epochs: a trial is not judged while its lr still ramps up)."""
    """ASHA: epochs every trial trains before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA keeps the best 1/factor of the trials at each rung (epochs grace_period x factor^k).
    Ray's default 4 did not stop more here: with 2 trials at a time, asynchronous promotion let
    the 8-trial bench sweep train 63 of 96 epochs with 4 and 56 of 104 with 2 (bench_kd B3-ASHA).
    Ties pass a rung: a metric that saturates (100% top-1) stops nothing; val/loss still ranks."""
    metric: str = "val/top1"
    """The metric trials are ranked on (and ASHA stops on), e.g. val/top1 or val/loss."""
    mode: str = "max"
    """max or min: whether a larger metric is better."""
    seed: int = 0
    """Seed of the search (which values are drawn); every trial trains with run.seed."""
    max_concurrent_trials: int = 0
    """0 = as many trials at once as the cluster's CPUs (GPUs) fit."""
    trial_runner: str = "auto"
    """auto: a 1-worker trial trains in its own Tune actor (no Ray Train start: ~15-20 s less per
    trial here); a crashed actor is retried run.max_failures times from its checkpoint. train:
    every trial is a TorchTrainer run (what trials of 2+ workers always are)."""

    def __post_init__(self):
        if not isinstance(self.space, dict):
            raise ConfigError("sweep.space must map config keys to values, e.g. "
                              "{distill.temperature: [1, 2, 4], distill.alpha: {uniform: [0.1, 0.9]}}")
        self.space = {key: _numbers(spec) for key, spec in self.space.items()}
        for key, spec in self.space.items():
            space_entry(key, spec)
        positive(self, "num_samples")
        positive(self, "grace_period")
        _choice(self, "search", ("random", "grid", "optuna"))
        _choice(self, "scheduler", ("asha", "none"))
        _choice(self, "mode", ("max", "min"))
        _choice(self, "trial_runner", ("auto", "train"))
        if self.reduction_factor <= 1:
            raise ConfigError("sweep.reduction_factor must be > 1 (ASHA keeps 1/factor per rung)")
        if self.max_concurrent_trials < 0:
            raise ConfigError("sweep.max_concurrent_trials must be >= 0 (0 = what the cluster fits)")


def _numbers(spec):
    """A space entry with its values in scientific notation (``1e-4``) read as floats: Tune
    samples and reports numbers, and a trial's config is coerced from them."""
    if isinstance(spec, list):
        return [scientific(v) for v in spec]
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, values), = spec.items()
        return {kind: [scientific(v) for v in values] if isinstance(values, list) else values}
    return spec


def _choice(obj, name: str, allowed: tuple) -> None:
    if getattr(obj, name) not in allowed:
        raise ConfigError(f"sweep.{name} must be one of {', '.join(allowed)}, got {getattr(obj, name)!r}")


def space_entry(key, spec) -> tuple[str, str, str, list]:
    """Check one search-space entry; returns (section, field, kind, values)."""
    section, _, name = str(key).partition(".")
    fields = {f.name for f in dataclasses.fields(RUN_SECTIONS[section])} if section in RUN_SECTIONS else ()
    if name not in fields and not _method_param(section, name):
        raise ConfigError(f"sweep.space key {key!r} is not a config key; use section.key, e.g. "
                          "distill.temperature, distill.alpha, optim.lr, distill.loss, or "
                          "distill.params.<name> (a setting of the method)")
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SPACE_KINDS):
        raise ConfigError(f"sweep.space.{key} must be a list of values or one of "
                          f"{{{'|'.join(SPACE_KINDS)}: [...]}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"sweep.space.{key}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if len(values) != 2 or not numeric or values[0] >= values[1]:
            raise ConfigError(f"sweep.space.{key}: {kind} needs [low, high] with low < high, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"sweep.space.{key}: loguniform needs low > 0, got {values[0]}")
    return section, name, kind, values


def _method_param(section: str, name: str) -> bool:
    """``distill.params.<name>``: one setting of the method (checked by the method)."""
    head, _, sub = name.partition(".")
    return section == "distill" and head == "params" and bool(sub) and "." not in sub


def apply_params(cfg, params: dict):
    """The config of one trial: ``cfg`` (a Config) with the sampled values set, and checked.

    ``distill.params.<name>`` sets one method setting; a trial whose ``distill.loss`` differs from
    the config's starts from no params (they belong to the config's method)."""
    changes: dict = {}
    method_params: dict = {}
    for key, value in params.items():
        section, name, _, _ = space_entry(key, [value])
        if _method_param(section, name):
            method_params[name.partition(".")[2]] = value
        else:
            changes.setdefault(section, {})[name] = value
    loss = changes.get("distill", {}).get("loss", cfg.distill.loss)
    if method_params or loss != cfg.distill.loss:
        base = dict(cfg.distill.params) if loss == cfg.distill.loss else {}
        changes.setdefault("distill", {})["params"] = {**base, **method_params}
    return cfg.replace(**changes)


def planned_trials(sweep: SweepConfig) -> int:
    """num_samples, times every grid's size (Tune's variant generator runs the full grid)."""
    n = sweep.num_samples
    if sweep.search != "optuna":
        for key, spec in sweep.space.items():
            _, _, kind, values = space_entry(key, spec)
            n *= len(values) if kind == "grid" else 1
    return n
