"""Model registry (torchvision classifiers + small CNNs), weight loading and the teacher file."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
import torchvision
from torch import nn

from kd_ray.errors import ConfigError, TeacherError
from kd_ray.registry import Registry

log = logging.getLogger(__name__)

MODELS = Registry("model")
TEACHER_FORMAT = "kd_ray-teacher-v1"

TORCHVISION_NAMES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2",
    "densenet121", "vgg16", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "convnext_tiny",
)


def _torchvision(name: str):
    def build(num_classes: int) -> nn.Module:
        # weights=None: never download; pretrained weights come from a local file.
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    return build


for _name in TORCHVISION_NAMES:
    MODELS.register(_name, _torchvision(_name))


def _conv(cin: int, cout: int, bn: bool = False) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return layers + [nn.ReLU(inplace=True)]


@MODELS.register("simple_cnn")
def simple_cnn(num_classes: int) -> nn.Module:
    """The original project's 3-conv student (~29k params)."""
    return nn.Sequential(
        *_conv(3, 16), nn.MaxPool2d(2),
        *_conv(16, 32), nn.MaxPool2d(2),
        *_conv(32, 64),
        # Adaptive: any input >= 28 px. A 3x3 grid (not 1x1) keeps where strokes are,
        # which these BN-free nets need to learn fast.
        nn.AdaptiveAvgPool2d(3), nn.Flatten(),
        nn.Linear(64 * 9, num_classes),
    )


@MODELS.register("tiny_cnn")
def tiny_cnn(num_classes: int) -> nn.Module:
    """An even smaller student (~5k params)."""
    return nn.Sequential(
        *_conv(3, 8), nn.MaxPool2d(2),
        *_conv(8, 16), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(5), nn.Flatten(),
        nn.Linear(16 * 25, num_classes),
    )


@MODELS.register("cnn_teacher")
def cnn_teacher(num_classes: int) -> nn.Module:
    """A ~420k-param CNN with BatchNorm and dropout; strong on 28 px digits."""
    return nn.Sequential(
        *_conv(3, 32, True), *_conv(32, 32, True), nn.MaxPool2d(2),
        *_conv(32, 64, True), *_conv(64, 64, True), nn.MaxPool2d(2),
        *_conv(64, 128, True), *_conv(128, 128, True), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),  # 28 px -> 3x3 -> 2x2 keeps some layout
        nn.Dropout(0.3), nn.Linear(512, 256), nn.ReLU(inplace=True),
        nn.Dropout(0.3), nn.Linear(256, num_classes),
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _strip_prefixes(state: dict) -> dict:
    # DDP saves "module.x", torch.compile saves "_orig_mod.x".
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


PRETRAINED_FIX = "give a local .pt/.pth file (weights are never downloaded)"


def require_file(path, error, what: str, fix: str) -> Path:
    """The path of an existing file, else a one-line ``error`` naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} not found; {fix}")
    return path


def _load_file(path, error, what: str, fix: str):
    """torch.load a local file (tensors only), with one-line errors of class ``error``."""
    path = require_file(path, error, what, fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise error(f"{what} {path} is unreadable: {exc}".splitlines()[0]) from None


def load_weights(model: nn.Module, path, arch: str = "model") -> list[str]:
    """Load a local weights file into ``model``, skipping keys whose shape differs.

    Returns the skipped keys (e.g. a 1000-class ImageNet head loaded into a 7-class model).
    """
    raw = _load_file(path, ConfigError, "pretrained weights", PRETRAINED_FIX)
    if isinstance(raw, dict):
        for key in ("state_dict", "model"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
    if not isinstance(raw, dict):
        raise ConfigError(f"pretrained weights {path} hold no state_dict")
    state = _strip_prefixes(raw)
    own = model.state_dict()
    fits = {k: v for k, v in state.items()
            if k in own and torch.is_tensor(v) and v.shape == own[k].shape}
    skipped = sorted(set(state) - set(fits))
    if not fits:
        raise ConfigError(f"pretrained weights {path} do not fit architecture {arch}: no key matches")
    model.load_state_dict(fits, strict=False)
    missing = set(own) - set(fits)
    if skipped or missing:
        log.info("loaded %s: %d keys, skipped %s, left at init %d",
                 path, len(fits), skipped, len(missing))
    return skipped


def build_model(name: str, num_classes: int, pretrained: str | None = None) -> nn.Module:
    model = MODELS.get(name)(num_classes)
    if pretrained:
        load_weights(model, pretrained, arch=name)
    return model


def export_teacher(path, model: nn.Module, arch: str, classes: list[str], image_size: int,
                   extra: dict | None = None) -> None:
    """Save the single teacher file the distill stage reads (written atomically)."""
    state = {k: v.detach().cpu() for k, v in _strip_prefixes(model.state_dict()).items()}
    payload = {
        "format": TEACHER_FORMAT, "arch": arch, "num_classes": len(classes),
        "classes": list(classes), "image_size": image_size,
        "state_dict": state, "extra": dict(extra or {}),
    }
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
    data = _load_file(path, TeacherError, "teacher file",
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
    model = MODELS.get(info["arch"])(info["num_classes"])
    try:
        model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as exc:
        raise TeacherError(
            f"teacher file {path} does not fit {info['arch']}: {exc}".splitlines()[0]
        ) from None
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
