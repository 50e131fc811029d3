"""Weights brought from elsewhere, read into a registered architecture: a torchvision state dict,
a safetensors file, a timm checkpoint (``state_dict`` / ``state_dict_ema`` entries), or a PyTorch
Lightning checkpoint (``state_dict`` whose keys carry the module's attribute, ``model.`` or
``student.``). Local files only; nothing is downloaded."""
from __future__ import annotations

import pickle
import types
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from kd_ray.errors import TeacherError, first_line
from kd_ray.models.zoo import require_file, strip_prefixes

FIX = "give a local weights file (.pt, .pth, .ckpt, .safetensors)"
WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema")  # checkpoint entries, in order


def read_weights(path) -> dict:
    """The tensors of a weights file, unwrapped from a checkpoint dict when there is one."""
    path = require_file(path, TeacherError, "weights file", FIX)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors  # local: only this format

        try:
            return load_safetensors(str(path))
        except Exception as exc:
            raise TeacherError(f"weights file {path} is unreadable: {first_line(exc)}") from None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # e.g. a Lightning checkpoint's hyper_parameters (Namespace)
        raw = _load_tensors_only(path)
    except Exception as exc:
        raise TeacherError(f"weights file {path} is unreadable: {first_line(exc)}") from None
    if isinstance(raw, dict):
        for key in WRAPPERS:
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
    state = {k: v for k, v in raw.items() if torch.is_tensor(v)} if isinstance(raw, dict) else {}
    if not state:
        raise TeacherError(f"weights file {path} holds no state_dict (a mapping of tensors); {FIX}")
    return state


class _Stub:
    """Stands in for any object of a checkpoint that is not a tensor: built, filled, ignored."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _TensorsOnly(pickle.Unpickler):
    """Resolves only what ``torch.load(weights_only=True)`` allows (tensors, storages, plain
    containers); every other class or function in the file becomes a ``_Stub``, so no code of the
    file runs, and the tensors still load."""

    def find_class(self, module, name):
        allowed = _allowed_globals()
        key = f"{module}.{name}"
        return allowed[key] if key in allowed else type(name, (_Stub,), {"__module__": module})


def _allowed_globals() -> dict:
    from torch._weights_only_unpickler import _get_allowed_globals  # local: torch-internal

    return _get_allowed_globals()


def _load_tensors_only(path):
    module = types.SimpleNamespace(Unpickler=_TensorsOnly, load=pickle.load, __name__="tensors_only")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)
    except Exception as exc:
        raise TeacherError(f"weights file {path} is unreadable: {first_line(exc)}") from None


def module_prefix(keys, own) -> str:
    """The prefix that, stripped from ``keys``, matches most of the model's own keys ("" for a
    plain state dict; "model." for a Lightning module whose ``self.model`` is the network)."""
    own = set(own)
    votes = Counter()
    for key in keys:
        for name in own:
            if key.endswith(name) and (len(key) == len(name) or key[-len(name) - 1] == "."):
                votes[key[:len(key) - len(name)]] += 1
    if not votes:
        return ""
    best = max(votes.values())
    return min((p for p, n in votes.items() if n == best), key=len)


def fit_weights(model: nn.Module, state: dict, arch: str, path, prefix: str | None = None) -> nn.Module:
    """Load ``state`` into ``model`` strictly, after stripping wrapper and module prefixes.

    One-line TeacherErrors: the first missing and first unexpected key, or a head sized for
    another number of classes (with the fix)."""
    state = strip_prefixes(state)
    own = model.state_dict()
    if prefix is None:
        prefix = module_prefix(state, own)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise TeacherError(f"weights {path} do not fit --arch {arch}: keys {', '.join(parts)}; "
                           "pick the architecture they were trained as"
                           + ("" if not prefix else f" (keys read after the prefix {prefix!r})"))
    for key, value in own.items():
        theirs = state[key]
        if theirs.shape != value.shape:
            what = (f"a {theirs.shape[0]}-class head" if value.dim() >= 1 and theirs.dim() == value.dim()
                    and theirs.shape[1:] == value.shape[1:] else "another shape")
            raise TeacherError(
                f"weights {path} have {what} at {key} {list(theirs.shape)}, but {arch} for this "
                f"data's {_classes(model, own, key)} needs {list(value.shape)}: fine-tune the "
                "teacher on this dataset's classes first (or point -c at the data it was trained on)")
    model.load_state_dict(state, strict=True)
    return model


def _classes(model: nn.Module, own: dict, key: str) -> str:
    return f"{own[key].shape[0]} classes" if own[key].dim() >= 1 else "classes"


def describe_source(path) -> str:
    """A short name of the file's format, for the import's log line."""
    suffix = Path(path).suffix
    return {".safetensors": "safetensors", ".ckpt": "checkpoint"}.get(suffix, "state dict")
