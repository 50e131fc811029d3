"""The collapse guard: stop a run whose student collapsed or diverged, and say what to change.

Plain Python over the epochs' metrics (no torch, no Ray): every rank holds the same summed metrics,
so every rank reaches the same verdict at the same epoch and stops together.
"""
from __future__ import annotations

import math

from kd_ray.errors import CollapseError

# The setting a user would turn down first, per method (its main weight), for the message.
MAIN_PARAM = {"dkd": "distill.params.beta", "dist": "distill.params.beta (and gamma)",
              "fitnets": "distill.params.weight", "at": "distill.params.beta",
              "kd": "distill.alpha", "mse_logits": "distill.alpha"}


def fixes(method: str, optim) -> str:
    """What to try, naming the current values."""
    clip = ("set optim.clip_grad_norm (e.g. 5)" if optim.clip_grad_norm is None
            else f"lower optim.clip_grad_norm ({optim.clip_grad_norm:g})")
    parts = [f"lower optim.lr ({optim.lr:g})", clip]
    if method in MAIN_PARAM:
        parts.append(f"lower {MAIN_PARAM[method]}")
    return ", ".join(parts)


def judged(epoch: int, guard, optim, steps_per_epoch: int | None) -> bool:
    """Whether the one-class rule may judge this epoch: past the learning-rate warm-up (the model
    has barely moved before) and past guard.min_steps steps (a short run on little data that
    has not learned yet is no collapse)."""
    warmed = epoch > math.ceil(optim.warmup_epochs)
    return warmed and (steps_per_epoch is None or epoch * steps_per_epoch >= guard.min_steps)


def check_collapse(history: list[dict], guard, *, method: str, optim,
                   steps_per_epoch: int | None = None) -> None:
    """Raise CollapseError when the last epochs of ``history`` show a collapsed or diverging
    student. Reads ``val/top_share`` (share of validation predictions in the most predicted class),
    ``val/label_share`` (the same for the true labels) and ``train/loss``."""
    if not history:
        return
    last = history[-1]
    epoch = last.get("epoch", len(history))
    share = guard.collapse_share
    if share is not None and len(history) >= guard.collapse_epochs:
        recent = history[-guard.collapse_epochs:]
        # A validation set dominated by one class is no collapse: its own share is the floor.
        if all(judged(h.get("epoch", epoch), guard, optim, steps_per_epoch)
               and h.get("val/top_share", 0.0) >= share > h.get("val/label_share", 1.0) for h in recent):
            raise CollapseError(
                f"the student collapsed: {100 * last['val/top_share']:.0f}% of the validation images "
                f"got one class in epochs {recent[0].get('epoch', '?')}-{epoch} (val top-1 "
                f"{100 * last.get('val/top1', 0.0):.1f}%); {fixes(method, optim)}; or raise "
                f"guard.collapse_share ({share:g}) if this is expected")
    growth = guard.loss_growth
    first = history[0].get("train/loss")
    now = last.get("train/loss")
    if growth is not None and first and now is not None and first > 0 and now > growth * first:
        raise CollapseError(
            f"the training loss diverged: {now:.3g} at epoch {epoch}, {now / first:.0f}x epoch "
            f"{history[0].get('epoch', 1)}'s {first:.3g}; {fixes(method, optim)}; or raise "
            f"guard.loss_growth ({growth:g})")
