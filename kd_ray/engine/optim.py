"""Optimizer and per-iteration learning-rate schedule."""
from __future__ import annotations

import torch


def build_optimizer(model: torch.nn.Module, optim_cfg, steps_per_epoch: int, epochs: int):
    """SGD or AdamW plus a per-iteration schedule: linear warm-up, then cosine or step decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optim_cfg.name == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
    total = max(1, steps_per_epoch * epochs)
    warmup = min(int(optim_cfg.warmup_epochs * steps_per_epoch), total - 1)
    sched = torch.optim.lr_scheduler
    if optim_cfg.schedule == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=total - warmup)
    elif optim_cfg.schedule == "step":
        step = max(1, optim_cfg.step_size * steps_per_epoch)
        main = sched.StepLR(optimizer, step_size=step, gamma=optim_cfg.gamma)
    else:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return optimizer, main
    ramp = sched.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    return optimizer, sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
