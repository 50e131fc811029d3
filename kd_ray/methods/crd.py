"""``crd``: contrastive representation distillation (Tian, Krishnan and Isola, ICLR 2020).

Both models' named layers (flattened) go through an embedding head (linear, then L2 norm) each;
each student embedding is contrasted with the teacher memory-bank row of its own image (the
positive) and ``nce_k`` other rows (negatives), and each teacher embedding likewise with the
student bank. The banks hold one row per training image, indexed by its position in kd_ray's
training (transfer) set, updated by momentum after each step. Written from the paper's equations
and the authors' RepDistiller code as remembered; the NCE loss, the scores and the bank update
are checked against torchdistill's ``CRDLoss`` (a port of that code) on fixed tensors.

Differences from the authors' code, which we were not sure to want or could not have:
- negatives are drawn uniformly from all positions (their CIFAR default, ``mode: exact``, draws
  them from other classes, which needs every image's label: a transfer set has none);
- the normalising constants Z are set on the first step (as theirs), averaged over the DDP ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kd_ray.errors import ConfigError
from kd_ray.methods.base import METHODS, layer_names
from kd_ray.methods.features import OneLayer, check_layers, hooked, shapes
from kd_ray.methods.logits import as_float, hinton_kd, non_negative

EPS = 1e-7  # the authors' eps in the NCE ratios


@dataclass
class CRDParams:
    student_layer: Optional[str] = None
    """Student module path whose output (flattened) is embedded: the layer feeding the classifier
    (e.g. avgpool for a torchvision ResNet)."""
    teacher_layer: Optional[str] = None
    """Teacher module path, likewise."""
    feat_dim: int = 128
    """Size of the embeddings and of each memory-bank row."""
    nce_k: int = 16384
    """Negatives per image (the paper's 16384; its cost is batch x nce_k x feat_dim per bank)."""
    nce_t: float = 0.07
    """Temperature of the scores exp(<bank row, embedding> / nce_t)."""
    nce_m: float = 0.5
    """Momentum of the bank: row <- normalise(nce_m * row + (1 - nce_m) * embedding)."""
    weight: float = 0.8
    """Weight of the CRD loss (the authors' beta: 0.8)."""

    def __post_init__(self):
        non_negative(self, "weight")
        for key in ("feat_dim", "nce_k"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.nce_t > 0:
            raise ValueError(f"nce_t must be > 0, got {self.nce_t}")
        if not 0 <= self.nce_m < 1:
            raise ValueError(f"nce_m must be in [0, 1), got {self.nce_m}")


class Embed(nn.Module):
    """The authors' head: flatten, linear, L2-normalise."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def scores(bank: torch.Tensor, contrast: torch.Tensor, anchor: torch.Tensor, nce_t: float) -> torch.Tensor:
    """exp(<bank[contrast[i, j]], anchor[i]> / nce_t): (B, K + 1), column 0 the positive."""
    rows = bank.index_select(0, contrast.reshape(-1)).view(*contrast.shape, -1).detach()
    return torch.exp(torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / nce_t)


def nce_loss(x: torch.Tensor, n_data: int) -> torch.Tensor:
    """The NCE loss of (B, K + 1) scores ``x`` already divided by Z (column 0 the positive):
    -(1/B) sum_i [log h(x_i0) + sum_j log(1 - h(x_ij))], h(x) = x / (x + K / N) (the paper's
    h with the noise term K * P_n, P_n = 1 / N uniform over the N training positions)."""
    k = x.shape[1] - 1
    noise = k / float(n_data)
    log_pos = torch.log(x[:, 0] / (x[:, 0] + noise + EPS))
    log_neg = torch.log(noise / (x[:, 1:] + noise + EPS))
    return -(log_pos.sum() + log_neg.sum()) / x.shape[0]


def gather_rows(index: torch.Tensor, rows: torch.Tensor):
    """Every rank's (index, rows), concatenated in rank order, when torch.distributed is
    initialised (batches may differ in size: padded to the largest, then trimmed); else as given."""
    if not (dist.is_available() and dist.is_initialized()):
        return index, rows
    world = dist.get_world_size()
    size = torch.tensor([index.shape[0]], device=index.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    most = int(max(s.item() for s in sizes))
    pad = most - index.shape[0]
    index_p = F.pad(index, (0, pad))
    rows_p = F.pad(rows, (0, 0, 0, pad))
    indices = [torch.empty_like(index_p) for _ in range(world)]
    gathered = [torch.empty_like(rows_p) for _ in range(world)]
    dist.all_gather(indices, index_p)
    dist.all_gather(gathered, rows_p)
    n = [int(s.item()) for s in sizes]
    return (torch.cat([i[:m] for i, m in zip(indices, n)]),
            torch.cat([r[:m] for r, m in zip(gathered, n)]))


@torch.no_grad()
def update_bank(bank: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, momentum: float) -> None:
    """bank[i] <- normalise(momentum * bank[i] + (1 - momentum) * row), in place. An index given
    twice (DDP's padding repeats a few images across ranks) is updated once, by its first row, so
    every rank writes the same values whatever order its scatter takes."""
    unique, inverse = torch.unique(index, return_inverse=True)
    order = torch.arange(index.shape[0], device=index.device)
    first = torch.full_like(unique, index.shape[0]).scatter_reduce_(0, inverse, order, reduce="amin")
    index, rows = index[first], rows[first].to(bank.dtype)
    mixed = bank.index_select(0, index) * momentum + rows * (1 - momentum)
    bank.index_copy_(0, index, F.normalize(mixed, dim=1))


@METHODS.register("crd")
class ContrastiveRepresentationKD(OneLayer):
    """kd + weight * (NCE(student embedding vs teacher bank) + NCE(teacher embedding vs student
    bank)). Trainable extras: the two embedding heads. Buffers (in the checkpoint): the banks
    ``memory_s``, ``memory_t`` (train_size x feat_dim) and ``z`` (the two normalising constants)."""

    Params = CRDParams
    needs_index = True

    def setup(self, student, teacher, sample, train_size=None):
        p = self.params
        if not (p.student_layer and p.teacher_layer):
            raise ConfigError(
                "crd needs distill.params.student_layer and distill.params.teacher_layer (module paths "
                "of the layers feeding the classifiers); student layers: "
                f"{', '.join(layer_names(student)[:10])}; teacher layers: {', '.join(layer_names(teacher)[:10])}")
        if not train_size:
            raise ConfigError("crd needs the training set's size for its memory bank (setup(train_size=))")
        check_layers(student, [p.student_layer], "student")
        check_layers(teacher, [p.teacher_layer], "teacher")
        s = shapes(student, sample, [p.student_layer])[p.student_layer]
        t = shapes(teacher, sample, [p.teacher_layer])[p.teacher_layer]
        self.embed_s = Embed(math.prod(s), p.feat_dim)
        self.embed_t = Embed(math.prod(t), p.feat_dim)
        # The authors' initialisation: uniform in +-1 / sqrt(feat_dim / 3) (rows of norm ~1).
        std = 1.0 / math.sqrt(p.feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(train_size, p.feat_dim).mul_(2 * std).sub_(std))
        self.register_buffer("memory_t", torch.rand(train_size, p.feat_dim).mul_(2 * std).sub_(std))
        self.register_buffer("z", torch.full((2,), -1.0))  # unset until the first step
        self._z_set = False

    def normalisers(self, out_s: torch.Tensor, out_t: torch.Tensor) -> torch.Tensor:
        """Z = mean score * N, set once on the first step (the authors' estimate of the partition
        function), averaged over the DDP ranks so that every rank uses the same."""
        if not self._z_set:  # one look at the tensor per process, not a host sync every step
            self._z_set = bool((self.z >= 0).all())
        if not self._z_set:
            z = torch.stack([out_s.detach().mean(), out_t.detach().mean()]).float() * self.memory_s.shape[0]
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(z)
                z /= dist.get_world_size()
            self.z.copy_(z)
            self._z_set = True
        return self.z

    def forward(self, student, teacher, labels, epoch, index=None):
        p = self.params
        if index is None:
            raise ConfigError("crd needs each image's training-set position: its batches come from "
                              "make_loaders(with_index=True)")
        f_s = hooked(student, p.student_layer, "crd", "student")
        f_t = hooked(teacher, p.teacher_layer, "crd", "teacher").detach()
        e_s, e_t = as_float(self.embed_s(f_s)), as_float(self.embed_t(f_t))
        n_data = self.memory_s.shape[0]
        index = index.to(e_s.device).long()
        contrast = torch.randint(0, n_data, (index.shape[0], p.nce_k + 1), device=e_s.device)
        contrast[:, 0] = index
        # In float32 even under bf16 autocast: exp(<a, b> / 0.07) magnifies a bf16 dot product's error.
        with torch.autocast(e_s.device.type, enabled=False):
            out_s = scores(self.memory_t, contrast, e_s, p.nce_t)  # student anchor, teacher bank
            out_t = scores(self.memory_s, contrast, e_t, p.nce_t)
            z = self.normalisers(out_s, out_t)
            crd = nce_loss(out_s / z[0], n_data) + nce_loss(out_t / z[1], n_data)
        all_index, rows = gather_rows(index, torch.cat([e_s, e_t], dim=1).detach())
        update_bank(self.memory_s, all_index, rows[:, :p.feat_dim], p.nce_m)
        update_bank(self.memory_t, all_index, rows[:, p.feat_dim:], p.nce_m)
        parts = hinton_kd(student, teacher, labels, self.cfg, "crd")
        parts["loss"] = parts["loss"] + p.weight * crd
        return {**parts, "crd": crd.detach()}
