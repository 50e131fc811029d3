"""What a stage trains and needs, checked on the driver before any worker starts: the model and
epochs of a stage, the inputs (data, registries, teacher file), what a rerun continues from, and
how a failed run is summed up in one line. No Ray here."""
from __future__ import annotations

import itertools
from pathlib import Path

from kd_ray.cache.fidelity import check_encoding
from kd_ray.config import Config, teacher_files
from kd_ray.config.checks import check_machine, check_paths
from kd_ray.config.sweep import apply_params, space_entry
from kd_ray.data import build_data, describe
from kd_ray.engine import checkpoints
from kd_ray.errors import ConfigError
from kd_ray.log import get
from kd_ray.methods import Distiller, build_method, method_class, setup_method
from kd_ray.models import (build_model, check_same_classes, check_teacher_matches, model_fn,
                           read_teacher_info)
from kd_ray.runs.files import read_failures
from kd_ray.runs.tracking import check_tracker
from kd_ray.storage import location
from kd_ray.runs.lock import fresh_name  # noqa: F401  (re-exported: cluster.stage uses it)

log = get(__name__)


def stage_model(cfg: Config, stage: str) -> tuple[str, str | None]:
    """(architecture, pretrained weights) of the model a stage trains."""
    if stage == "teacher":
        return cfg.model.teacher, cfg.model.teacher_pretrained
    return cfg.model.student, cfg.model.student_pretrained


def stage_epochs(cfg: Config, stage: str) -> int:
    if stage == "teacher" and cfg.optim.teacher_epochs:
        return cfg.optim.teacher_epochs
    return cfg.optim.epochs


def stage_method(cfg: Config, stage: str) -> str:
    """The method a stage trains with: labels only for the teacher and the baseline student."""
    return cfg.distill.loss if stage == "distill" else "ce"


def preflight(cfg: Config, stage: str, teacher_pending: bool = False) -> Config:
    """Catch bad input on the driver, before any worker starts. Returns the config to run.

    ``teacher_pending``: the teacher file is still to be trained (pipeline), so skip its checks.
    """
    check_paths(cfg, (stage,))
    check_machine(cfg)
    check_tracker(cfg)  # an unreachable MLflow server: one line now, not after the first epoch
    cfg = cfg.with_absolute_paths()
    if stage == "teacher" and cfg.optim.teacher_epochs == 0:
        raise ConfigError("optim.teacher_epochs=0 trains no teacher: set it to at least 1, or bring "
                          "a trained one with `kd-ray import-teacher` and set distill.teacher_path")
    model_fn(stage_model(cfg, stage)[0])
    method = build_method(cfg.distill, stage_method(cfg, stage))  # checks distill.params too
    needs_teacher = method.teacher is not None
    info = describe(cfg.data)
    teacher_arch = cfg.model.teacher  # the pipeline's, until a teacher file says otherwise
    if stage == "distill" and needs_teacher and not teacher_pending:
        paths = teacher_files(cfg.distill)
        if not paths:
            raise ConfigError("distill needs a teacher: set distill.teacher_path to a teacher.pt "
                              "from `kd-ray train-teacher` or `kd-ray import-teacher`, or run "
                              "`kd-ray pipeline`")
        teacher = check_same_classes(paths) if len(paths) > 1 else read_teacher_info(paths[0])
        check_teacher_matches(teacher, info.classes)
        if len(paths) > 1 and method.teacher == "features":
            raise ConfigError(f"distill.loss={cfg.distill.loss} reads teacher features, which an "
                              "ensemble does not have: give one distill.teacher_path")
        # A teacher trained here sets the student's size; an imported one is resized for instead.
        imported = (teacher.get("extra") or {}).get("imported")
        teacher_arch = teacher["arch"]
        if cfg.data.image_size is None and teacher.get("image_size") and not imported:
            cfg = cfg.replace(data={"image_size": teacher["image_size"]})
    if cfg.data.image_size is None:
        # Resolved here, once: the sweep's teacher cache, its sweep.yaml and best.yaml, and a later
        # `kd-ray distill -c best.yaml` then all name the same size (the cache manifest compares it).
        cfg = cfg.replace(data={"image_size": info.image_size})
    if stage == "distill":
        check_method_setup(cfg, method, teacher_arch, len(info.classes))
        if method.teacher == "logits" and cfg.distill.teacher_cache != "off":
            check_encoding(cfg, len(info.classes), method)  # a lossy cache the loss cannot bear
    return cfg


def check_method_setup(cfg: Config, method: Distiller, teacher_arch: str, num_classes: int) -> None:
    """The method's ``setup`` on the driver, with the stage's models (untrained: only their layers
    and shapes matter) and one validation image: a layer the model does not have or a feature
    shape the method cannot map stops here, before Ray starts, as on every worker later."""
    if method.teacher != "features" and type(method).setup is Distiller.setup:
        return  # nothing to check, and no model to build
    student = build_model(stage_model(cfg, "distill")[0], num_classes)
    teacher = build_model(teacher_arch, num_classes) if method.teacher is not None else None
    bundle = build_data(cfg.data, "distill", cfg.run.seed)
    setup_method(method, student, teacher, bundle.val[0][0][None], len(bundle.train))


def check_cache_teacher(cfg: Config) -> Config:
    """``kd-ray cache-teacher``'s input: a logits method and a distill stage that passes preflight."""
    if method_class(cfg.distill.loss).teacher != "logits":
        raise ConfigError(f"distill.loss={cfg.distill.loss} reads no teacher logits: nothing to cache")
    return preflight(cfg, "distill")


def check_pipeline(cfg: Config, train_teacher: bool, distill: bool, methods=None) -> None:
    """Every stage's input of a pipeline (every method's and assistant's too), before the first
    one starts."""
    train_teacher = train_teacher or not cfg.distill.teacher_path  # as run_pipeline decides
    for stage in ("teacher",) * train_teacher + ("student",):
        preflight(cfg, stage, teacher_pending=train_teacher)
    if not distill:
        return
    methods = list(methods or [cfg.distill.loss])
    if len(set(methods)) != len(methods):
        raise ConfigError(f"methods to compare are listed twice: {methods}")
    unused = sorted(set(cfg.distill.method_params) - set(methods))
    if unused:
        raise ConfigError(f"distill.method_params has settings for {', '.join(unused)}, which is not "
                          f"among the methods run ({', '.join(methods)}): add it to --methods or "
                          "drop its entry")
    for method in methods:
        preflight(method_config(cfg, method), "distill", teacher_pending=train_teacher)
    for arch in cfg.model.assistants:
        if method_class(cfg.distill.loss).teacher != "logits":
            raise ConfigError(f"model.assistants: a teacher-assistant chain distils with a logits "
                              f"method (kd, mse_logits, ...), not distill.loss={cfg.distill.loss}")
        preflight(assistant_config(cfg, arch, cfg.distill.teacher_path, "off", cfg.run.seed),
                  "distill", teacher_pending=train_teacher)


def method_config(cfg: Config, method: str) -> Config:
    """``cfg`` distilling with ``method``: its ``distill.method_params`` entry, and for
    ``distill.loss`` ``distill.params`` over that; other methods of a comparison run with their
    defaults. An entry's ``temperature`` and ``alpha`` set the distill section's for that method
    only (each method at its own T: {dist: {temperature: 1, beta: 2}})."""
    params = dict(cfg.distill.method_params.get(method) or {})
    shared = {key: params.pop(key) for key in SHARED_KEYS if key in params}
    if method == cfg.distill.loss:
        params.update(cfg.distill.params)
    return cfg.replace(distill={"loss": method, "params": params, **shared})


SHARED_KEYS = ("temperature", "alpha")  # distill-section keys a method_params entry may set


def distill_run_name(cfg: Config, method: str, seed: int) -> str:
    """``distill-seed<s>`` for ``distill.loss`` (the pipeline's name), ``distill-<method>-seed<s>``
    for the other methods of a comparison."""
    if method == cfg.distill.loss:
        return f"distill-seed{seed}"
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in method)
    return f"distill-{safe}-seed{seed}"


def method_label(cfg: Config, method: str, compare: bool) -> str:
    return f"student, distilled ({method})" if compare else "student, distilled"


def assistant_config(cfg: Config, arch: str, teacher_path, teacher_cache: str, seed: int) -> Config:
    """An assistant of a chain: a distill run whose student is ``arch``."""
    return cfg.replace(model={"student": arch, "student_pretrained": None}, run={"seed": seed},
                       distill={"teacher_path": teacher_path, "teacher_cache": teacher_cache,
                                "teacher_weights": cfg.distill.teacher_weights
                                if teacher_path == cfg.distill.teacher_path else None})


def check_sweep(cfg: Config, train_teacher: bool) -> Config:
    """Every bad input the driver can see, before Ray starts: space, values, data, teacher."""
    if cfg.run.elastic:  # trials share a cluster: Tune places them, each at a fixed size
        raise ConfigError(f"run.num_workers={cfg.run.num_workers}: a sweep's trials take a fixed worker "
                          "count; set one number (elastic groups are for train-teacher, distill, pipeline)")
    if not cfg.sweep.space:
        raise ConfigError("sweep.space is empty: name what to search, e.g. --set "
                          "'sweep.space={distill.temperature: [1, 2, 4, 8], distill.alpha: [0.1, 0.5, 0.9]}'")
    choices, classes = [], None
    for key, spec in cfg.sweep.space.items():
        _, _, kind, values = space_entry(key, spec)
        choices.append([(key, v) for v in (values if kind in ("grid", "choice") else values[:2])])
    for n, combo in enumerate(itertools.product(*choices)):
        if n == 256:  # enough to find a bad value or method/params pair; a big grid is not walked
            break
        trial = apply_params(cfg, dict(combo))  # e.g. alpha=1.5 fails here
        method = build_method(trial.distill)  # an unknown method, or a params key it does not take
        model_fn(trial.model.student)
        d = trial.distill
        lossy = d.cache_encoding in ("int8", "topk") or (d.cache_encoding is None and d.cache_top_k)
        if lossy and method.teacher == "logits" and d.teacher_cache != "off" \
                and type(method).setup is Distiller.setup:
            # each trial's method and temperature (preflight checks the base config's, set up)
            classes = classes or len(describe(cfg.data).classes)
            check_encoding(trial, classes)
    if train_teacher:
        preflight(cfg, "teacher")
    return preflight(cfg, "distill", teacher_pending=train_teacher)


def check_resume(cfg: Config, stage: str, run_dir: Path) -> dict | None:
    """The manifest (plus ``folder``) of the checkpoint a rerun continues from, or None.

    Checked on the driver, before any worker starts: a checkpoint of another model or class
    list is a ConfigError (a retry could never load it).
    """
    found = checkpoints.latest(run_dir)
    if found is None:
        return None
    folder, manifest, _ = found
    arch = stage_model(cfg, stage)[0]
    had = [str(c) for c in manifest.get("classes") or []]
    classes = [str(c) for c in describe(cfg.data).classes]
    if manifest.get("arch") != arch or had != classes:
        raise ConfigError(
            f"run {run_dir.name} holds checkpoints of {manifest.get('arch')} on {len(had)} classes "
            f"but this run trains {arch} on {len(classes)} classes"
            + ("" if had == classes or len(had) != len(classes) else " (other class names)")
            + ": start a fresh run beside it with --new, or pick another run.name")
    return {**manifest, "folder": folder.name}


def failure_message(cfg: Config, run_dir: Path, before: int, exc: Exception) -> str:
    """One line: how many attempts failed, and the first error with its rank."""
    failures = read_failures(run_dir)[before:]
    attempts = len(failures) or 1
    if failures:
        # When one rank dies the others fail in their collective ("Connection reset by peer"):
        # name the rank that did not fail that way, if there is one.
        errors = sorted(failures[0]["errors"].items(), key=lambda kv: (_collateral(kv[1]), int(kv[0])))
        rank, error = errors[0]
        first = f"rank {rank}: {error}"
    else:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        first = lines[-1] if lines else repr(exc)
    return (f"{attempts} attempt(s) failed (run.max_failures={cfg.run.max_failures}); "
            f"first error: {first}")


def _collateral(error: str) -> bool:
    return any(mark in error for mark in ("gloo", "NCCL", "Connection reset by peer",
                                          "Connection closed by peer"))


def describe_setup(cfg: Config) -> str:
    lpc = cfg.data.labels_per_class
    labels = (f"{lpc} labels per class; the other training images form an unlabelled transfer set "
              "that only the distillation loss sees" if lpc else "all training labels")
    files = teacher_files(cfg.distill)
    teacher = (f"teacher {cfg.model.teacher} trained on all labels" if not files else
               f"teacher {files[0]}" if len(files) == 1 else f"an ensemble of {len(files)} teachers")
    chain = "".join(f" -> {a}" for a in cfg.model.assistants)
    return (f"dataset {cfg.data.name}; {teacher}{chain and f' (assistants{chain})'}; "
            f"student {cfg.model.student} with {labels}; loss {cfg.distill.loss} "
            f"(T={cfg.distill.temperature or 'the method default'}, alpha={cfg.distill.alpha}); "
            f"seeds {cfg.run.seeds}")
