"""One training epoch and one evaluation pass, in plain PyTorch (no Ray here).

Both return sums and counts rather than means, so that callers can add them across DDP ranks
and get exact dataset-level numbers.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kd_ray.errors import KdRayError, NonFiniteLossError, PeerFailedError

NO_STEP = 2**62  # "no bad step" in the MIN all-reduce of stop_together
SAVE, STOP = 1, 2  # rank 0's wish at a check: a mid-epoch checkpoint; one, then every rank stops


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on GPU; a no-op context elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Images batch to ``device``; NHWC layout when asked (faster convolutions on GPU)."""
    if channels_last and images.dim() == 4:
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images.to(device, non_blocking=True)


def train_one_epoch(
    step_module: torch.nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    device: torch.device,
    teacher: Optional[torch.nn.Module] = None,
    scheduler=None,
    amp: bool = False,
    channels_last: bool = False,
    check_every: Optional[int] = None,
    clip_grad_norm: Optional[float] = None,
    on_step: Optional[Callable] = None,
    resume=None,
    mid_epoch=None,
) -> dict:
    """Train for one pass over ``loader``.

    ``step_module(inputs, labels, epoch, teacher=..., cached=...)`` returns a dict with "loss" and
    its parts: a ``methods.TrainStep`` (student + method), possibly wrapped in DDP. Batches are
    ``(inputs, labels)``, or ``(inputs, labels, teacher_logits)`` from a teacher cache, either
    possibly followed by a dict of keyword tensors for the step (``{"index": positions}`` for a
    method that ``needs_index``); otherwise
    the teacher, when given, runs without autograd and in eval mode. Returns sums: ``loss_sum``
    and ``<part>_sum`` weighted by batch size, ``images``, ``seconds``, ``teacher_images``
    (images the teacher ran on).

    Sums stay on the device, and a non-finite loss is looked for every ``check_every`` steps
    (default: every step in a single CPU process; every 25 on GPU, where each look makes the GPU
    wait for the host, and across ranks, where each look is a collective). Under torch.distributed
    each look is shared by all ranks (``stop_together``): a NaN loss or a bad image on one rank
    stops every rank at the same step. ``clip_grad_norm``: clip the gradients' global norm.
    ``on_step(step, images so far, loss)`` after every step (engine.progress.StepProgress).

    ``resume`` (engine.resume.Resume): ``loader`` holds the epoch's steps after ``resume.step``;
    sums start from ``resume.sums``. ``mid_epoch`` (engine.resume.MidEpoch): when rank 0's
    ``due()`` rides on a check, every rank calls ``save(steps done, sums)`` after that step.
    """
    if check_every is None:
        check_every = 1 if device.type == "cpu" and _world() == 1 else 25
    step_module.train()
    if teacher is not None:
        teacher.eval()  # a caller's model.train() must never flip the teacher's BatchNorm/dropout
    first = resume.step if resume is not None else 0
    before = dict(resume.sums) if resume is not None else {}
    sums: dict[str, torch.Tensor] = {key: torch.tensor(value, dtype=torch.float32, device=device)
                                     for key, value in before.items() if key.endswith("_sum")}
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    bad_value = torch.zeros((), device=device)
    images = teacher_images = 0
    start = time.perf_counter()
    save_after = 0  # 0, SAVE or STOP: rank 0's wish, shared by the last check
    done = first  # the epoch's steps done

    def check(error):  # reads bad_step and bad_value as they are at the time of the check
        nonlocal save_after
        save_after = stop_together(error, device, bad_step, bad_value, epoch,
                                   wish=mid_epoch.due(done, steps) if mid_epoch is not None else 0)

    def totals() -> dict:
        out = {key: float(value) for key, value in sums.items()}  # one wait for the GPU
        out["images"] = images + before.get("images", 0)
        out["teacher_images"] = teacher_images + before.get("teacher_images", 0)
        out["seconds"] = time.perf_counter() - start + before.get("seconds", 0.0)
        return out

    steps = first + len(loader)
    started = resume.restore if resume is not None else None
    for step, (inputs, labels, *rest) in enumerate(_batches(loader, check_every, check, started), first):
        inputs = to_device(inputs, device, channels_last)
        labels = labels.to(device, non_blocking=True)
        # A trailing dict holds keyword tensors for the step (data.views.Indexed: {"index": ...}).
        keywords = rest.pop() if rest and isinstance(rest[-1], dict) else {}
        keywords = {k: v.to(device, non_blocking=True) for k, v in keywords.items()}
        logits = rest[0].to(device, non_blocking=True) if rest else None
        with autocast_for(device, amp):
            parts = step_module(inputs, labels, epoch, teacher=teacher, cached=logits, **keywords)
        if teacher is not None and logits is None:
            teacher_images += inputs.shape[0]
        loss = parts["loss"]
        first_bad = ~torch.isfinite(loss.detach()) & (bad_step < 0)
        bad_step = torch.where(first_bad, step, bad_step)
        bad_value = torch.where(first_bad, loss.detach().float(), bad_value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm is not None:  # after DDP's all-reduce: every rank clips alike
            torch.nn.utils.clip_grad_norm_(step_module.parameters(), clip_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        batch = inputs.shape[0]
        images += batch
        if on_step is not None:
            on_step(step, images, loss.detach())
        for name, value in parts.items():
            key = f"{name}_sum"
            sums[key] = sums.get(key, 0.0) + torch.as_tensor(value).detach().float() * batch
        done = step + 1
        if save_after and done < steps:  # every rank: the wish came with the last check
            stop_together(None, device, bad_step, bad_value, epoch)  # never save a NaN's weights
            mid_epoch.save(done, totals(), stop=save_after == STOP)
        save_after = 0
    return totals()


def _batches(loader, check_every: int, check: Callable, started: Optional[Callable] = None):
    """``loader``'s batches, with ``check(error)`` before every ``check_every``-th one and after
    the last. A KdRayError while loading (a corrupt image) is kept for the next check; until then
    this rank repeats its last good batch, so it joins the same collectives as the others (step 0
    is always checked, so a good batch exists by then). ``started()`` once the iterator exists.
    """
    error, last, batches = None, None, iter(loader)
    if started is not None:
        started()
    for step in range(len(loader)):
        if error is None:
            try:
                last = next(batches)
            except StopIteration:
                break
            except KdRayError as exc:
                error = exc
        if step % check_every == 0:
            check(error)
        yield last
    check(error)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _non_finite(bad_value: torch.Tensor, epoch, step: int) -> NonFiniteLossError:
    return NonFiniteLossError(f"non-finite loss ({float(bad_value)}) at epoch {epoch} step {step}: "
                              "lower optim.lr, set or lower optim.clip_grad_norm, or check the inputs and the loss")


def stop_together(error: Optional[Exception], device: torch.device, bad_step=None, bad_value=None,
                  epoch: Optional[int] = None, wish: int = 0) -> int:
    """Raise on every rank at once if any rank failed; return the largest ``wish`` of any rank
    (rank 0's wish for a mid-epoch checkpoint, and whether to stop after it, carried by the same
    all-reduce).

    Every rank calls this at the same points. One small all-reduce shares the first step with a
    non-finite loss (``bad_step``, -1 for none) and whether a rank holds a KdRayError, so that no
    rank moves on to a collective that a failed rank will never join.
    """
    if bad_step is None:
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
    if _world() == 1:  # nobody to tell: one host read (this runs every step on CPU)
        if error is not None:
            raise error
        if int(bad_step) >= 0:
            raise _non_finite(bad_value, epoch, int(bad_step))
        return int(wish)
    flags = torch.stack([torch.where(bad_step < 0, NO_STEP, bad_step),
                         torch.tensor(-int(error is not None), device=device),
                         torch.tensor(-int(wish), device=device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    first_bad, failed, wished = flags.tolist()
    if error is not None:
        raise error
    if first_bad != NO_STEP:
        if int(bad_step) == first_bad:
            raise _non_finite(bad_value, epoch, first_bad)
        raise PeerFailedError(f"another rank had a non-finite loss at epoch {epoch} step {first_bad}")
    if failed:
        raise PeerFailedError("another rank stopped with an error")
    return -int(wished)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, *, device: torch.device, amp: bool = False,
             channels_last: bool = False, num_classes: Optional[int] = None) -> dict:
    """Sums over ``loader``: ``loss_sum`` (cross-entropy), ``correct1``, ``correct5``, ``count``,
    and per class ``pred_counts`` (predicted) and ``label_counts`` (true) for the collapse guard
    (``num_classes`` long, so that ranks with an empty share add up too)."""
    model.eval()
    totals = {"loss_sum": torch.zeros((), device=device),
              "correct1": torch.zeros((), dtype=torch.long, device=device),
              "correct5": torch.zeros((), dtype=torch.long, device=device)}
    preds = labels_seen = None
    if num_classes:
        preds = torch.zeros(num_classes, dtype=torch.long, device=device)
        labels_seen = torch.zeros(num_classes, dtype=torch.long, device=device)
    count = 0
    for inputs, labels in loader:
        inputs = to_device(inputs, device, channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast_for(device, amp):
            logits = model(inputs)
        logits = logits.float()
        totals["loss_sum"] += F.cross_entropy(logits, labels, reduction="sum")
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
        totals["correct1"] += hits[:, 0].sum()
        totals["correct5"] += hits.any(dim=1).sum()
        classes = logits.shape[1]
        batch_preds = torch.bincount(logits.argmax(1), minlength=classes)
        batch_labels = torch.bincount(labels.clamp(0, classes - 1), minlength=classes)
        preds = batch_preds if preds is None else preds + batch_preds
        labels_seen = batch_labels if labels_seen is None else labels_seen + batch_labels
        count += labels.numel()
    return {"loss_sum": float(totals["loss_sum"]), "correct1": int(totals["correct1"]),
            "correct5": int(totals["correct5"]), "count": count,
            "pred_counts": [] if preds is None else preds.tolist(),
            "label_counts": [] if labels_seen is None else labels_seen.tolist()}


def split_metrics(sums: dict, num_classes: int, prefix: str = "val") -> dict:
    """Top-1/5, loss and the share of the most predicted (and most common) class of one split."""
    count = max(sums["count"], 1)
    metrics = {f"{prefix}/loss": sums["loss_sum"] / count, f"{prefix}/top1": sums["correct1"] / count}
    if num_classes >= 5:
        metrics[f"{prefix}/top5"] = sums["correct5"] / count
    if sums.get("pred_counts"):
        metrics[f"{prefix}/top_share"] = max(sums["pred_counts"]) / count
        metrics[f"{prefix}/label_share"] = max(sums["label_counts"]) / count
    return metrics


def epoch_metrics(train: dict, val: dict, num_classes: int) -> dict:
    """Turn summed train/val counters (already added across ranks) into reported metrics."""
    images = max(train["images"], 1)
    metrics = {
        f"train/{key[:-4]}": value / images for key, value in train.items() if key.endswith("_sum")
    }
    metrics.update(split_metrics(val, num_classes))
    metrics["perf/epoch_seconds"] = train["seconds"]
    metrics["perf/images_per_s"] = train["images"] / train["seconds"] if train["seconds"] else math.nan
    metrics["perf/teacher_images"] = train.get("teacher_images", 0)  # 0 when logits are cached
    return metrics
