"""The teacher file: one ``teacher.pt`` with architecture, classes, image size and weights."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from kd_ray.errors import TeacherError, first_line
from kd_ray.storage import is_uri, location
from kd_ray.models.zoo import MODELS, build_model, load_file, strip_prefixes

TEACHER_FORMAT = "kd_ray-teacher-v1"


def export_teacher(path, model: nn.Module, arch: str, classes: list[str], image_size: int,
                   extra: dict | None = None, norm: tuple | None = None) -> None:
    """Save the single teacher file the distill stage reads (written atomically).

    ``image_size`` and ``norm`` ((mean, std) per channel) are the teacher's own input: a
    student's batch of another size or normalisation is adapted for it (``models.ensemble``).
    """
    state = {k: v.detach().cpu() for k, v in strip_prefixes(model.state_dict()).items()}
    payload = {
        "format": TEACHER_FORMAT, "arch": arch, "num_classes": len(classes),
        "classes": list(classes), "image_size": image_size,
        "mean": list(norm[0]) if norm else None, "std": list(norm[1]) if norm else None,
        "state_dict": state, "extra": dict(extra or {}),
    }
    if is_uri(path):  # one object: written whole or not at all
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        location(path).write_bytes(buffer.getvalue())
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same folder so os.replace is atomic: readers never see half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_teacher(path) -> dict:
    data = load_file(path, TeacherError, "teacher file",
                      "run `kd-ray train-teacher` first or set distill.teacher_path")
    if not isinstance(data, dict) or data.get("format") != TEACHER_FORMAT:
        raise TeacherError(
            f"{path} is not a kd_ray teacher file (format {TEACHER_FORMAT}); "
            "export one with `kd-ray train-teacher`"
        )
    if data.get("arch") not in MODELS:
        raise TeacherError(f"teacher file {path} uses unknown architecture {data.get('arch')!r}")
    return data


def read_teacher_info(path) -> dict:
    """Everything in the teacher file except the weights (for driver-side checks)."""
    return {k: v for k, v in _read_teacher(path).items() if k != "state_dict"}


def load_teacher(path, device="cpu") -> tuple[nn.Module, dict]:
    """Build the teacher, load its weights strictly, freeze it and put it in eval mode."""
    data = _read_teacher(path)
    info = {k: v for k, v in data.items() if k != "state_dict"}
    model = build_model(info["arch"], info["num_classes"])
    try:
        model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as exc:
        raise TeacherError(f"teacher file {path} does not fit {info['arch']}: {first_line(exc)}") from None
    model.to(device).eval().requires_grad_(False)
    return model, info


def _describe(classes: list) -> str:
    names = [str(c) for c in classes]
    return ", ".join(names) if len(names) <= 6 else f"{names[0]}..{names[-1]}"


def check_teacher_matches(info: dict, classes: list[str]) -> None:
    """Raise TeacherError if the teacher's classes are not the dataset's (count and order)."""
    teacher = [str(c) for c in info.get("classes", [])]
    data = [str(c) for c in classes]
    fix = "train the teacher on this dataset or point distill.teacher_path at a matching teacher"
    if len(teacher) != len(data):
        raise TeacherError(
            f"teacher has {len(teacher)} classes ({_describe(teacher)}) but the dataset has "
            f"{len(data)} ({_describe(data)}): {fix}"
        )
    if teacher != data:
        i = next(i for i, (a, b) in enumerate(zip(teacher, data)) if a != b)
        raise TeacherError(
            f"teacher classes differ from the dataset's: class {i} is {teacher[i]!r} for the "
            f"teacher but {data[i]!r} in the dataset: {fix}"
        )
