"""Model registry: torchvision classifiers and small CNNs (``pkg.module:fn`` plugins too), local weights."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from kd_ray.config.checks import PRETRAINED_FIX
from kd_ray.errors import ConfigError, first_line
from kd_ray.registry import Registry
from kd_ray.storage import location, open_bytes

log = logging.getLogger(__name__)  # a child of the "kd_ray" logger

MODELS = Registry("model")

TORCHVISION_NAMES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2",
    "densenet121", "vgg16", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "convnext_tiny",
)


def _torchvision(name: str):
    def build(num_classes: int) -> nn.Module:
        import torchvision  # here: its import costs ~2 CPU s (torch._dynamo), which small-CNN runs skip

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


def strip_prefixes(state: dict, prefixes=("module.", "_orig_mod.")) -> dict:
    """Keys without wrapper prefixes: DDP saves "module.x", torch.compile "_orig_mod.x"; a
    PyTorch Lightning module "model.x" or "student.x" (pass those in ``prefixes``)."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


TIMM_PREFIX = "timm:"


def model_fn(name: str):
    """``fn(num_classes) -> nn.Module`` for a registry name, a plugin, or ``timm:<model>`` (the
    optional ``timm`` extra; built with ``pretrained=False``: weights come from a local file)."""
    if str(name).startswith(TIMM_PREFIX):
        try:
            import timm  # local: optional, and slow to import
        except ImportError:
            raise ConfigError(f"model {name!r} needs timm: pip install 'kd_ray[timm]'") from None
        model_name = name[len(TIMM_PREFIX):]
        if not timm.is_model(model_name):
            raise ConfigError(f"timm has no model {model_name!r}; see timm.list_models()")
        return lambda num_classes: timm.create_model(model_name, pretrained=False,
                                                     num_classes=num_classes)
    return MODELS.get(name)


def require_file(path, error, what: str, fix: str) -> Path:
    """The path of an existing file, else a one-line ``error`` naming the fix."""
    path = location(path)  # a local file or an object in storage
    if not path.is_file():
        raise error(f"{what} {path} not found; {fix}")
    return path


def load_file(path, error, what: str, fix: str):
    """torch.load a local file (tensors only), with one-line errors of class ``error``."""
    path = require_file(path, error, what, fix)
    try:
        source = path if isinstance(path, Path) else open_bytes(path)
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise error(f"{what} {path} is unreadable: {first_line(exc)}") from None


def load_weights(model: nn.Module, path, arch: str = "model") -> list[str]:
    """Load a local weights file into ``model``, skipping keys whose shape differs.

    Returns the skipped keys (e.g. a 1000-class ImageNet head loaded into a 7-class model).
    """
    raw = load_file(path, ConfigError, "pretrained weights", PRETRAINED_FIX)
    if isinstance(raw, dict):
        for key in ("state_dict", "model"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
    if not isinstance(raw, dict):
        raise ConfigError(f"pretrained weights {path} hold no state_dict")
    state = strip_prefixes(raw)
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
    """A registered architecture (or a ``pkg.module:fn`` plugin taking num_classes) with fresh or
    local pretrained weights."""
    model = model_fn(name)(num_classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {name!r} built a {type(model).__name__}, not a torch.nn.Module")
    if pretrained:
        load_weights(model, pretrained, arch=name)
    return model
