"""``reviewkd``: distilling knowledge via knowledge review (Chen, Liu, Zhao and Jia, CVPR 2021).

The student's features at several levels are fused from deep to shallow by attention-based fusion
(ABF) modules: each level's feature goes through a 1x1 conv to ``mid_channels``, is mixed with the
deeper level's fused feature (upsampled) by two attention maps, and a 3x3 conv maps the result to
the teacher's channels at that level. The hierarchical context loss (HCL) compares each fused map
with the teacher's: MSE at full resolution plus MSE of average-pooled maps at 4x4, 2x2 and 1x1
(each level smaller than the map), weights 1, 1/2, 1/4, 1/8, divided by their sum. Written from
the paper and the authors' code as remembered (as mdistiller and torchdistill port it); the ABF
and HCL are checked against torchdistill's ``AttentionBasedFusion`` and
``HierarchicalContextLoss`` on fixed tensors.

Differences from the authors' code: the layers are any named module outputs (their code takes
the teacher's *pre-ReLU* block outputs and adds the student's pooled feature as the deepest level;
here a vector output, e.g. ``avgpool`` or ``flatten``, counts as a 1x1 map, so that can be named
too); the total is kd_ray's kd term (``distill.alpha: 0`` gives their CE + review loss), and
their warm-up (the review loss ramped over 20 epochs in mdistiller) is ``warmup``, 0 by default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kd_ray.errors import ConfigError
from kd_ray.methods.base import METHODS
from kd_ray.methods.features import LayerPairs, check_layer_lists, fmt, hooked
from kd_ray.methods.logits import as_float, hinton_kd, non_negative

LEVELS = (4, 2, 1)  # the pooled sizes of the HCL


@dataclass
class ReviewKDParams:
    student_layers: list = field(default_factory=list)
    """Student module paths, shallow to deep (e.g. [layer1, layer2, layer3, layer4])."""
    teacher_layers: list = field(default_factory=list)
    """Teacher module paths, pairwise with student_layers; empty: the same paths."""
    mid_channels: Optional[int] = None
    """Channels of the fused features; None: min(512, the deepest student layer's channels)."""
    weight: float = 1.0
    """Weight of the review loss (the sum over layer pairs of the HCL)."""
    warmup: int = 0
    """Epochs over which the review loss ramps up linearly (weight * min(epoch / warmup, 1)); 0 = none."""

    def __post_init__(self):
        non_negative(self, "weight", "warmup")
        if self.mid_channels is not None and int(self.mid_channels) < 1:
            raise ValueError(f"mid_channels must be >= 1, got {self.mid_channels}")
        check_layer_lists(self)


class ABF(nn.Module):
    """Attention-based fusion of one level (the authors' ABF; attribute names as torchdistill's
    ``AttentionBasedFusion``). ``fuse``: mix in the deeper level's fused feature."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.attention_conv = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, deeper=None, out_size=None):
        """(output at the teacher's channels and ``out_size``, the fused mid feature passed on)."""
        x = self.conv1(x)
        if self.attention_conv is not None:
            deeper = F.interpolate(deeper, x.shape[2:], mode="nearest")
            z = self.attention_conv(torch.cat([x, deeper], dim=1))
            x = x * z[:, :1] + deeper * z[:, 1:]
        if out_size is not None and tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")  # to the teacher map's size
        return self.conv2(x), x


def hcl(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Hierarchical context loss of one pair of (B, C, H, W) maps: (MSE + sum_l w_l MSE(pool_l)) /
    (1 + sum_l w_l), w halving per level l in 4, 2, 1 below the maps' height."""
    loss, weight, total = F.mse_loss(fs, ft), 1.0, 1.0
    for size in LEVELS:
        if size >= fs.shape[2]:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
        total += weight
    return loss / total


def as_map(x: torch.Tensor) -> torch.Tensor:
    """A (B, C) vector as a (B, C, 1, 1) map (a pooled feature: the authors' deepest level)."""
    return x[:, :, None, None] if x.dim() == 2 else x


@METHODS.register("reviewkd")
class ReviewKD(LayerPairs):
    """kd + weight * min(epoch / warmup, 1) * sum over layer pairs of HCL(fused student, teacher).
    Trainable extras: the ABF modules (one per level), in DDP, the optimizer and the checkpoint."""

    Params = ReviewKDParams
    layout_hint = "a list of module paths, shallow to deep"

    def setup(self, student, teacher, sample):
        pairs = []
        for s_name, t_name, s, t in self.layer_shapes("reviewkd", student, teacher, sample):
            s, t = (s + (1, 1) if len(s) == 1 else s), (t + (1, 1) if len(t) == 1 else t)
            if len(s) != 3 or len(t) != 3:
                raise ConfigError(
                    f"reviewkd cannot fuse student layer {s_name!r} ({fmt(s)}) with teacher layer {t_name!r} "
                    f"({fmt(t)}): it needs (C, H, W) maps or (C) vectors; pick other distill.params."
                    "student_layers / teacher_layers")
            pairs.append((s_name, s, t))
        for (a, sa, _), (b, sb, _) in zip(pairs, pairs[1:]):
            if sb[1] > sa[1] or sb[2] > sa[2]:
                raise ConfigError(
                    f"reviewkd fuses deep to shallow: student layer {b!r} ({fmt(sb)}) is larger than the layer "
                    f"before it, {a!r} ({fmt(sa)}); list distill.params.student_layers shallow to deep")
        mid = self.params.mid_channels or min(512, pairs[-1][1][0])
        last = len(pairs) - 1
        self.abfs = nn.ModuleList(ABF(s[0], mid, t[0], fuse=i < last) for i, (_, s, t) in enumerate(pairs))
        self.out_sizes = [t[1:] for _, _, t in pairs]

    def fuse(self, features: list) -> list:
        """The student's maps (shallow to deep) fused deep to shallow; returned shallow to deep."""
        results, deeper = [], None
        for i in reversed(range(len(features))):
            out, deeper = self.abfs[i](features[i], deeper, self.out_sizes[i])
            results.insert(0, out)
        return results

    def forward(self, student, teacher, labels, epoch):
        p = self.params
        s = [as_map(hooked(student, n, "reviewkd", "student")) for n in self.student_layers]
        t = [as_map(hooked(teacher, n, "reviewkd", "teacher")).detach() for n in self.teacher_layers]
        fused = self.fuse(s)
        review = sum(hcl(as_float(f), ft) for f, ft in zip(fused, t))
        ramp = min(epoch / p.warmup, 1.0) if p.warmup else 1.0
        parts = hinton_kd(student, teacher, labels, self.cfg, "reviewkd")
        parts["loss"] = parts["loss"] + p.weight * ramp * review
        return {**parts, "review": review.detach()}
