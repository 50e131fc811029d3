"""What a rerun continues from, and how a failed run ends: on the driver, before and after fit().

A rerun of a run name resumes from its newest usable checkpoint (checked here, so a checkpoint
of another model or class list stops before any worker starts); ``--new`` starts a fresh run
beside it. Errors a retry cannot fix come back from the workers as the train function's return
value (no retry used); other failures are retried by Ray and summed up in one line.
"""
from __future__ import annotations

from pathlib import Path

from kd_ray import checkpoints
from kd_ray.config import Config
from kd_ray.errors import ConfigError, KdRayError
from kd_ray.tb_callback import read_failures


def quiet(*args, **kwargs) -> None:
    pass


def fresh_name(storage: Path, name: str) -> str:
    """``name`` if no run has it yet, else the first free ``name-2``, ``name-3``, ..."""
    if not (storage / name).exists():
        return name
    n = 2
    while (storage / f"{name}-{n}").exists():
        n += 1
    print(f"[kd_ray] {storage / name} exists; --new starts {name}-{n} beside it", flush=True)
    return f"{name}-{n}"


def check_resume(cfg: Config, stage: str, run_dir: Path, warn=print) -> dict | None:
    """The manifest (plus ``folder``) of the checkpoint a rerun continues from, or None.

    Checked on the driver, before any worker starts: a checkpoint of another model or class
    list is a ConfigError (a retry could never load it).
    """
    from kd_ray.data import describe
    from kd_ray.train_loop import stage_model

    found = checkpoints.latest(run_dir, warn=warn)
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


def raise_returned_error(result) -> None:
    """Raise the KdRayError that stopped every worker at once (see train_loop.shared_error)."""
    from kd_ray import errors

    value = getattr(result, "return_value", None)
    if isinstance(value, dict) and value.get("error"):
        cls = getattr(errors, value["error"], None)
        if not (isinstance(cls, type) and issubclass(cls, KdRayError)):
            cls = KdRayError
        raise cls(value["message"])


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
