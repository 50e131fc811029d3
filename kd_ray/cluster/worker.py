"""The per-worker function Ray Train runs on every rank: build, resume, loop, report."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

import ray.train
import ray.train.torch

from kd_ray import checkpoints
from kd_ray.config import Config
from kd_ray.data import build_data
from kd_ray.engine import build_optimizer, epoch_metrics, evaluate, stop_together, train_one_epoch
from kd_ray.errors import KdRayError, PeerFailedError
from kd_ray.faults import Faults
from kd_ray.losses import get_loss
from kd_ray.models import build_model, load_teacher
from kd_ray.teacher_cache import load as load_cache
from kd_ray.views import CachedViews, ViewSampler

STATE_FILE = checkpoints.STATE_FILE


def stage_model(cfg: Config, stage: str) -> tuple[str, str | None]:
    """(architecture, pretrained weights) of the model a stage trains."""
    if stage == "teacher":
        return cfg.model.teacher, cfg.model.teacher_pretrained
    return cfg.model.student, cfg.model.student_pretrained


def stage_epochs(cfg: Config, stage: str) -> int:
    if stage == "teacher" and cfg.optim.teacher_epochs:
        return cfg.optim.teacher_epochs
    return cfg.optim.epochs


def cached_logits_folder(cfg: Config, stage: str, needs_teacher: bool) -> str | None:
    """The teacher cache the driver resolved for this run (launch/tune call teacher_cache.resolve)."""
    folder = cfg.distill.teacher_cache
    if stage != "distill" or not needs_teacher or folder in ("off", "auto"):
        return None  # "auto" only reaches here from callers that skip resolve: run the teacher
    return folder


def make_loaders(bundle, batch_size: int, rank: int, world: int, seed: int, workers: int):
    """Shuffled, sharded training loader and an exact (unpadded) validation shard."""
    per_worker = max(1, batch_size // world)
    if isinstance(bundle.train, CachedViews):  # yields (view, sample) ids, a new view each epoch
        sampler = ViewSampler(bundle.train, bundle.train.views, bundle.train.seed,
                              num_replicas=world, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = DistributedSampler(bundle.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    # drop_last keeps BatchNorm away from 1-image batches; tiny sets keep their only batch.
    drop_last = len(sampler) > per_worker
    train = DataLoader(bundle.train, batch_size=per_worker, sampler=sampler, drop_last=drop_last,
                       num_workers=workers, persistent_workers=workers > 0)
    # Every val image is seen exactly once across ranks, so summed counts give exact accuracy.
    shard = Subset(bundle.val, range(rank, len(bundle.val), world))
    val = DataLoader(shard, batch_size=per_worker * 2, num_workers=workers)
    return train, sampler, val


def all_sum(values: dict, device: torch.device, max_keys=("seconds",)) -> dict:
    """Add counters across ranks (wall seconds take the slowest rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    summed = [k for k in keys if k not in max_keys]
    maxed = [k for k in keys if k in max_keys]
    out = {}
    for names, op in ((summed, dist.ReduceOp.SUM), (maxed, dist.ReduceOp.MAX)):
        if not names:
            continue
        t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op)
        out.update(zip(names, t.tolist()))
    return out


def _quiet_ray_train(level: str) -> None:
    """Ray's LoggingConfig misses the per-report INFO line, whose logger is named by file path."""
    from ray.train.v2._internal.execution import context

    logging.getLogger("ray.train").setLevel(level)
    logging.getLogger(context.__file__).setLevel(level)


def train_loop_per_worker(loop_config: dict) -> dict | None:
    """Train the stage; returns None, or the KdRayError that stopped every rank (for the driver)."""
    cfg = Config.from_dict(loop_config["config"])
    stage = loop_config["stage"]
    _quiet_ray_train(cfg.run.ray_log_level)
    torch.set_num_threads(cfg.run.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.run.seed + rank)
    device = ray.train.torch.get_device()
    amp = cfg.run.bf16 and device.type == "cuda"
    nhwc = cfg.run.channels_last and device.type == "cuda"
    fmt = torch.channels_last if nhwc else torch.preserve_format

    loss_fn, needs_teacher = get_loss(cfg.distill.loss if stage == "distill" else "ce")
    cache = cached_logits_folder(cfg, stage, needs_teacher)
    bundle = build_data(cfg.data, stage, cfg.run.seed)
    if cache:  # the teacher never runs: its logits for the replayed views come with each batch
        bundle.train = CachedViews(bundle.train, load_cache(cache), cfg.data.split_seed)
    train_loader, sampler, val_loader = make_loaders(
        bundle, cfg.optim.batch_size, rank, world, cfg.run.seed, cfg.data.loader_workers
    )
    arch, pretrained = stage_model(cfg, stage)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(arch, bundle.num_classes, pretrained=pretrained).to(memory_format=fmt)
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1
    teacher = None
    if needs_teacher and not cache:
        teacher, _ = load_teacher(cfg.distill.teacher_path, device=device)  # frozen, eval, no DDP
        teacher = teacher.to(memory_format=fmt)
    epochs = stage_epochs(cfg, stage)
    optimizer, scheduler = build_optimizer(model, cfg.optim, len(train_loader), epochs)
    unwrapped = model.module if hasattr(model, "module") else model

    run_dir = Path(loop_config["run_dir"])
    faults = Faults(loop_config["faults"], rank) if loop_config.get("faults") else None  # tests only
    say = print if rank == 0 else (lambda *args, **kwargs: None)
    if rank == 0:
        checkpoints.clean_partial(run_dir)  # the previous attempt's rank 0 is gone
    # Every rank picks the same folder: the newest that passes its checks (then older ones).
    start_epoch, history = 0, []
    found = checkpoints.latest(run_dir, with_state=True, map_location=device, warn=say)
    if found:
        folder, manifest, state = found
        unwrapped.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], manifest.get("history", [])
        say(f"[kd_ray] resuming {run_dir.name} from epoch {start_epoch + 1} ({folder.name})", flush=True)
    if faults:
        faults.event("attempt", start_epoch=start_epoch + 1)

    try:
        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch)
            loader = faults.wrap(train_loader, epoch + 1) if faults else train_loader
            train_sums = train_one_epoch(
                model, loader, loss_fn, optimizer, epoch=epoch + 1, device=device, loss_cfg=cfg.distill,
                teacher=teacher, scheduler=scheduler, amp=amp, channels_last=nhwc,
            )
            try:
                val_sums, error = evaluate(model, val_loader, device=device, amp=amp, channels_last=nhwc), None
            except KdRayError as exc:  # a corrupt val image: stop with the other ranks
                val_sums, error = None, exc
            stop_together(error, device)
            metrics = epoch_metrics(all_sum(train_sums, device), all_sum(val_sums, device),
                                    bundle.num_classes)
            metrics.update(epoch=epoch + 1, epochs=epochs, lr=optimizer.param_groups[0]["lr"])
            history.append(metrics)
            state = {
                "model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "stage": stage,
                "arch": arch, "classes": bundle.classes, "image_size": bundle.image_size,
                "config": cfg.to_dict(),
            }
            _report(metrics, state if rank == 0 else None, run_dir, history)
    except KdRayError as exc:
        # Every rank got here at the same check (engine.stop_together). Ending normally with the
        # error as the return value uses no Ray retry: a retry would fail the same way.
        return shared_error(exc, world)
    return None


def shared_error(exc: KdRayError, world: int) -> dict:
    """The lowest rank's own error (not a PeerFailedError), the same on every rank."""
    from kd_ray.launch import one_line

    mine = None if isinstance(exc, PeerFailedError) else (type(exc).__name__, one_line(exc))
    errors = [mine] * world
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_gather_object(errors, mine)
    rank, (kind, message) = next(((r, e) for r, e in enumerate(errors) if e),
                                 (0, (type(exc).__name__, one_line(exc))))
    return {"error": kind, "message": f"{message} (rank {rank})"}


def _report(metrics: dict, state: dict | None, run_dir: Path, history: list) -> None:
    """Every rank reports (it is a barrier); rank 0 first writes the checkpoint where it stays."""
    if state is None:
        ray.train.report(metrics, checkpoint=None)
        return
    folder = checkpoints.save(run_dir, state, history)  # atomic: whole folder or none
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint(str(folder)),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
