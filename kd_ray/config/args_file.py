"""The original project's ``commandline_args.txt`` (JSON flags) read as a kd_ray config."""
from __future__ import annotations

import json
from pathlib import Path

from kd_ray.errors import ConfigError

# The original project's commandline_args.txt flags -> (section, key).
ARGS_FILE_KEYS = {
    "teacher_model": ("model", "teacher"),
    "student_model": ("model", "student"),
    "data_dir": ("data", "root"),
    "train_data": ("data", "train_split"),
    "val_data": ("data", "val_split"),
    "image_size": ("data", "image_size"),
    "num_classes": ("data", "num_classes"),
    "max_epochs": ("optim", "epochs"),
    "batch_size": ("optim", "batch_size"),
    "learning_rate": ("optim", "lr"),
    "momentum": ("optim", "momentum"),
    "num_workers": ("data", "loader_workers"),
}
ARGS_FILE_STAGE_FLAGS = ("train_teacher", "distill", "gpus")


def read_args_file(path) -> tuple[dict, dict]:
    """Read the original project's JSON flags file; returns (raw config, stage flags)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"args file {path} not found; pass the path of commandline_args.txt")
    try:
        flags = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"args file {path} is not valid JSON: {exc}") from None
    unknown = set(flags) - set(ARGS_FILE_KEYS) - set(ARGS_FILE_STAGE_FLAGS)
    if unknown:
        raise ConfigError(
            f"unknown flag(s) {sorted(unknown)} in {path}; known: "
            + ", ".join(sorted([*ARGS_FILE_KEYS, *ARGS_FILE_STAGE_FLAGS]))
        )
    raw: dict = {}
    for flag, value in flags.items():
        if flag in ARGS_FILE_KEYS:
            section, key = ARGS_FILE_KEYS[flag]
            raw.setdefault(section, {})[key] = value
    if "data_dir" in flags:
        raw.setdefault("data", {})["name"] = "imagefolder"
    gpus = flags.get("gpus")
    if gpus:
        raw.setdefault("run", {}).update(num_workers=int(gpus), use_gpu=True)
    stages = {k: bool(flags[k]) for k in ("train_teacher", "distill") if k in flags}
    return raw, stages
