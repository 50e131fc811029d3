"""The teacher as the student's batch sees it: one teacher file or an ensemble of them, each run at
its own input size and normalisation.

A teacher brought from elsewhere (``kd-ray import-teacher``) may expect 224 px ImageNet-normalised
images while the student trains on 28 px digits normalised to [-1, 1]: ``InputAdapter`` resizes
the batch and re-normalises it before the teacher's forward pass. An ensemble's logits are the
weighted mean of its teachers' logits.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_ray.errors import TeacherError
from kd_ray.models.teacher import load_teacher, read_teacher_info


class InputAdapter:
    """Student batch (size ``src_size``, normalised with ``src_norm``) -> the teacher's input."""

    def __init__(self, src_size: int, src_norm, dst_size: Optional[int], dst_norm):
        self.size = dst_size if dst_size and dst_size != src_size else None
        same = dst_norm is None or _close(src_norm, dst_norm)
        self.src_norm, self.dst_norm = src_norm, None if same else dst_norm

    @property
    def needed(self) -> bool:
        return self.size is not None or self.dst_norm is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            shrink = self.size < x.shape[-1]
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=shrink)
        if self.dst_norm is not None:  # undo the student's normalisation, apply the teacher's
            (m0, s0), (m1, s1) = self.src_norm, self.dst_norm
            x = x * _per_channel(s0, x) + _per_channel(m0, x)
            x = (x - _per_channel(m1, x)) / _per_channel(s1, x)
        return x


def _per_channel(values, x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)


def _close(a, b) -> bool:
    return all(abs(float(u) - float(v)) < 1e-6 for pa, pb in zip(a, b) for u, v in zip(pa, pb))


def teacher_norm(info: dict):
    """(mean, std) recorded in a teacher file, or None (files from before they were recorded:
    the teacher was trained on this data, so it takes the student's normalisation)."""
    if info.get("mean") is None or info.get("std") is None:
        return None
    return tuple(info["mean"]), tuple(info["std"])


def adapt_input(model: nn.Module, adapter: InputAdapter) -> nn.Module:
    """Run ``adapter`` on the input of every forward pass (a pre-hook: the module tree, and so the
    layer names that feature methods hook, stay as they are)."""
    if adapter.needed:
        model.register_forward_pre_hook(lambda _module, args: (adapter(args[0]), *args[1:]))
    return model


class TeacherEnsemble(nn.Module):
    """Weighted mean of the members' logits (weights normalised to sum to 1)."""

    def __init__(self, members: Sequence[nn.Module], weights: Optional[Sequence[float]] = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        weights = list(weights) if weights is not None else [1.0] * len(members)
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for weight, member in zip(self.weights, self.members):
            logits = member(x).float() * weight
            out = logits if out is None else out + logits
        return out


def check_same_classes(paths: Sequence[str]) -> dict:
    """The first teacher's info, after checking that every teacher has its class list."""
    infos = [read_teacher_info(p) for p in paths]
    first = [str(c) for c in infos[0].get("classes", [])]
    for path, info in zip(paths[1:], infos[1:]):
        other = [str(c) for c in info.get("classes", [])]
        if other == first:
            continue
        if len(other) != len(first):
            detail = f"{len(other)} classes against {len(first)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(first, other)) if a != b)
            detail = f"class {i} is {other[i]!r} there but {first[i]!r} in {paths[0]}"
        raise TeacherError(f"the ensemble's teachers must share one class list: {path} has "
                           f"{detail}; export every teacher on the same dataset")
    return infos[0]


def load_teachers(paths: Sequence[str], weights, image_size: int, norm, device="cpu") -> nn.Module:
    """The frozen teacher the student's batches go through: one file, or an ensemble of them,
    each adapted to its own input size and normalisation."""
    paths = list(paths)
    if len(paths) > 1:
        check_same_classes(paths)
    members = []
    for path in paths:
        model, info = load_teacher(path, device=device)
        adapter = InputAdapter(image_size, norm, info.get("image_size"), teacher_norm(info))
        members.append(adapt_input(model, adapter))
    if len(members) == 1:
        return members[0]
    return TeacherEnsemble(members, weights).to(device).eval().requires_grad_(False)
