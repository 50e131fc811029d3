"""What ``kd-ray auto`` searches, checked on the driver before Ray starts (no Ray here).

Each method has a small grid over its temperature and its main weight (the settings users ask
"how do I set" about); the search draws up to ``budget`` of them, the same number per method
where it can, in a seeded order.
"""
from __future__ import annotations

import random

from kd_ray.config import Config
from kd_ray.config.sweep import apply_params
from kd_ray.data import describe
from kd_ray.errors import ConfigError
from kd_ray.log import get
from kd_ray.methods import build_method, method_class
from kd_ray.runs.stages import preflight

log = get(__name__)

T, ALPHA = "distill.temperature", "distill.alpha"
DEFAULT_METHODS = ("kd", "dkd", "dist")


def _grid(method: str) -> list[dict]:
    """The candidate settings of one method (values from the papers' ranges)."""
    if method == "kd":
        return [{T: t, ALPHA: a} for t in (1.0, 2.0, 4.0, 8.0) for a in (0.5, 0.9)]
    if method == "dkd":
        return [{T: t, "distill.params.beta": b} for t in (1.0, 2.0, 4.0) for b in (1.0, 2.0, 8.0)]
    if method == "dist":
        return [{T: t, "distill.params.beta": w, "distill.params.gamma": w}
                for t in (1.0, 2.0, 4.0) for w in (0.5, 1.0, 2.0)]
    if method == "mse_logits":
        return [{ALPHA: a} for a in (0.5, 0.7, 0.9)]
    if method == "fitnets":
        return [{"distill.params.weight": w} for w in (0.1, 1.0, 10.0)]
    if method == "at":
        return [{"distill.params.beta": b} for b in (100.0, 1000.0, 5000.0)]
    if method == "crd":
        return [{"distill.params.weight": w} for w in (0.4, 0.8, 1.6)]
    if method == "reviewkd":
        return [{"distill.params.weight": w} for w in (0.5, 1.0, 5.0)]
    if method == "ctkd":  # its temperature is learnt: the weight of its KD term alone
        return [{ALPHA: a} for a in (0.5, 0.7, 0.9)]
    if method == "mlkd":  # its temperatures are a fixed set: the weight of its alignments
        return [{"distill.params.kd_weight": w} for w in (0.5, 1.0, 2.0)]
    return [{T: t} for t in (1.0, 2.0, 4.0)]  # a plugin: its temperature only


def candidates(methods, budget: int, seed: int = 0) -> list[dict]:
    """Up to ``budget`` settings, each ``{"distill.loss": m, key: value ...}``, round-robin over
    the methods (each method's grid shuffled with ``seed``)."""
    rng = random.Random(seed)
    grids = []
    for method in methods:
        grid = [{"distill.loss": method, **g} for g in _grid(method)]
        rng.shuffle(grid)
        grids.append(grid)
    picked = []
    while len(picked) < budget and any(grids):
        for grid in grids:
            if grid and len(picked) < budget:
                picked.append(grid.pop())
    return picked


def short(params: dict) -> str:
    """``dkd T=2 beta=8``: a candidate as one phrase."""
    names = {T: "T", ALPHA: "alpha"}
    rest = [f"{names.get(k, k.rsplit('.', 1)[-1])}={v:g}" if isinstance(v, float) else
            f"{names.get(k, k.rsplit('.', 1)[-1])}={v}" for k, v in params.items() if k != "distill.loss"]
    return " ".join([str(params.get("distill.loss", "?")), *rest])


def check_auto(cfg: Config, methods, budget: int, seeds: int) -> list[dict]:
    """Refuse bad input in one line; returns the candidates."""
    if budget < 1:
        raise ConfigError(f"--budget must be >= 1 (search trials), got {budget}")
    if seeds < 2:
        raise ConfigError(f"--seeds must be >= 2: the verdict's interval needs paired seeds, got {seeds}")
    for method in methods:
        cls = method_class(method)  # an unknown name fails here, listing the known ones
        if cls.teacher is None:
            raise ConfigError(f"auto compares distillation with labels only: {method!r} uses no teacher; "
                              "leave it out of --methods")
        if cls.teacher == "features" and not (cfg.distill.method_params.get(method)
                                              or (cfg.distill.loss == method and cfg.distill.params)):
            raise ConfigError(f"{method} needs its layers: set distill.method_params.{method} (e.g. "
                              f"{{{method}: {{student_layers: [...]}}}}) in the config")
    found = candidates(methods, budget, cfg.sweep.seed)
    for params in found:
        build_method(trial_config(cfg, params).distill)  # a params key the method does not take
    return found


def trial_config(cfg: Config, params: dict) -> Config:
    """``cfg`` with one candidate applied, over the method's ``distill.method_params`` entry."""
    method = params["distill.loss"]
    base = dict(cfg.distill.method_params.get(method) or {})
    if method == cfg.distill.loss:
        base.update(cfg.distill.params)
    return apply_params(cfg.replace(distill={"loss": method, "params": base}), params)


def prepare(cfg: Config, methods, budget: int, seeds: int) -> tuple[Config, list]:
    """Driver checks before Ray: a test split (data.test_fraction 0.2 when the data has none),
    the candidates, the stages."""
    if describe(cfg.data).test_count == 0:
        log.info("the data has no test split: holding out data.test_fraction=0.2 of the training "
                 "images (stratified), never trained on, read once at the end")
        cfg = cfg.replace(data={"test_fraction": 0.2})
    found = check_auto(cfg, methods, budget, seeds)
    if not cfg.distill.teacher_path:
        preflight(cfg, "teacher")
    return preflight(cfg, "distill", teacher_pending=not cfg.distill.teacher_path), found
