"""The per-worker function Ray Train runs on every rank: build, resume, loop, report."""
from __future__ import annotations

import contextlib
import importlib
import logging
import math
import tempfile
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from kd_ray import log as kd_log
from kd_ray.cache import load as load_cache
from kd_ray.config import Config, teacher_files
from kd_ray.data import build_data
from kd_ray.data.views import CachedViews
from kd_ray.engine import (StepProgress, all_sum, build_optimizer, check_collapse, checkpoints,
                           epoch_metrics, evaluate, make_loaders, shard_loader, split_metrics,
                           stop_together, train_one_epoch)
from kd_ray.engine.resume import MidEpoch, StopMidEpoch, resume_from
from kd_ray.errors import KdRayError, PeerFailedError, to_payload
from kd_ray.methods import TrainStep, build_method, setup_method
from kd_ray.models import build_model, load_teachers
from kd_ray.runs.files import STOP_FILE, prune_mid_epoch
from kd_ray.runs.stages import stage_epochs, stage_method, stage_model
from kd_ray.storage import is_uri, location

log = kd_log.get(__name__)
FAULTS_ENV = "KD_RAY_FAULTS"  # the chaos suite's fault plan (tests only)
FAULTS_MODULE = "kd_ray.testing.faults"  # imported by name, and only when that plan is set


class Hooks:
    """Points where tests may act on a worker (the chaos suite's fault plan); no-ops otherwise."""

    def attempt(self, start_epoch: int, method=None) -> None:
        """An attempt starts at ``start_epoch``, with ``method`` (its extras) restored if resumed."""

    def loader(self, loader, epoch: int, start: int = 0):
        """``loader`` of ``epoch``, whose first step is step ``start`` (a resumed epoch)."""
        return loader


def worker_hooks(loop_config: dict, rank: int) -> Hooks:
    plan = loop_config.get("faults")
    if not plan:
        return Hooks()
    return importlib.import_module(FAULTS_MODULE).Faults(plan, rank)


def cached_logits_folder(cfg: Config, stage: str) -> str | None:
    """The teacher cache the driver resolved for this run (cluster.cache.resolve_cache)."""
    folder = cfg.distill.teacher_cache
    if stage != "distill" or folder in ("off", "auto"):
        return None  # "auto" only reaches here from callers that skip resolve: run the teacher
    return folder


def _quiet_ray_train(level: str) -> None:
    """Ray's LoggingConfig misses the per-report INFO line, whose logger is named by file path."""
    from ray.train.v2._internal.execution import context  # local: Ray's internals, used once

    logging.getLogger("ray.train").setLevel(level)
    logging.getLogger(context.__file__).setLevel(level)


class TrainSession:
    """A Ray Train worker's side of the loop: rank and device from Train, DDP, reports to Train
    (a 1-worker sweep trial uses cluster.trial.TrialSession instead)."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, model):
        return ray.train.torch.prepare_model(model)  # DDP when world > 1

    def preempted(self) -> bool:
        """Whether Ray Train's preemption watcher marked this worker (a node of the run is being
        drained). Read from this rank's own context: ray.train.get_preemption_info() would be a
        Ray collective per call, and rank 0's answer rides on the loop's all-reduce anyway."""
        try:
            from ray.train.v2._internal.execution.context import get_train_context

            return get_train_context().preemption_context.preemption_info is not None
        except (ImportError, AttributeError, RuntimeError):  # another Ray version: no notice
            return False

    def report(self, metrics: dict, state: dict | None, run_dir, history: list) -> None:
        """Every rank reports (it is a barrier); rank 0 first writes the checkpoint where it stays.

        On object storage rank 0 writes the folder here and Ray's own upload copies it into the run
        (an upload cut short leaves a folder that fails its checks and is skipped on resume).
        """
        here = tempfile.TemporaryDirectory() if is_uri(run_dir) else contextlib.nullcontext(run_dir)
        with here as where:
            folder, error = None, None
            if state is not None:
                try:  # atomic: whole folder or none
                    folder = checkpoints.save(where, state, history)
                except KdRayError as exc:  # a full disk: every rank stops here alike, no retry
                    error = exc
            stop_together(error, self.device)  # no rank waits alone in the report's barrier
            if folder is None:
                ray.train.report(metrics, checkpoint=None)
            elif is_uri(run_dir):
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                                 checkpoint_dir_name=folder.name)
            else:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint(str(folder)),
                                 checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


def train_loop_per_worker(loop_config: dict) -> dict | None:
    """What Ray Train runs on every rank."""
    return train_loop(loop_config, TrainSession())


def train_loop(loop_config: dict, session) -> dict | None:
    """Train the stage; returns None, or the KdRayError that stopped every rank (for the driver)."""
    entered = time.time()
    cfg = Config.from_dict(loop_config["config"])
    stage = loop_config["stage"]
    _quiet_ray_train(cfg.run.ray_log_level)
    torch.set_num_threads(cfg.run.threads_per_worker)
    rank, world, device = session.rank, session.world, session.device
    kd_log.configure(logging.INFO if rank == 0 else logging.ERROR)  # one rank speaks for all
    torch.manual_seed(cfg.run.seed + rank)
    amp = cfg.run.bf16 and device.type == "cuda"
    nhwc = cfg.run.channels_last and device.type == "cuda"
    fmt = torch.channels_last if nhwc else torch.preserve_format

    method = build_method(cfg.distill, stage_method(cfg, stage))
    cache = cached_logits_folder(cfg, stage) if method.teacher == "logits" else None
    bundle = build_data(cfg.data, stage, cfg.run.seed)
    if cache:  # the teacher never runs: its logits for the replayed views come with each batch
        try:  # a row file cut short (cache.CacheError): every rank stops alike, no retry fixes it
            logits, error = load_cache(cache), None
        except KdRayError as exc:
            logits, error = None, exc
        try:
            stop_together(error, device)
        except KdRayError as exc:
            return shared_error(exc, world)
        bundle.train = CachedViews(bundle.train, logits, cfg.data.split_seed)
    train_loader, sampler, val_loader = make_loaders(
        bundle, cfg.optim.batch_size, rank, world, cfg.run.seed, cfg.data.loader_workers,
        with_index=method.needs_index,  # e.g. crd's memory bank: one row per training image
    )
    arch, pretrained = stage_model(cfg, stage)
    torch.manual_seed(cfg.run.seed)  # identical initial weights (student and extras) on every rank
    student = build_model(arch, bundle.num_classes, pretrained=pretrained)
    teacher = None
    if method.teacher is not None and not cache:
        # Frozen, eval, never in DDP; one file or an ensemble, each fed at its own size/normalisation.
        teacher = load_teachers(teacher_files(cfg.distill), cfg.distill.teacher_weights,
                                bundle.image_size, bundle.norm)
    try:  # models and sample on the CPU: e.g. a regressor sized by a layer's output
        setup_method(method, student, teacher, bundle.val[0][0][None], len(bundle.train))
    except KdRayError as exc:  # a bad layer name or image: every rank stops here alike
        return shared_error(exc, world)
    if teacher is not None:
        teacher = teacher.to(device, memory_format=fmt)
    step = TrainStep(student, method).to(memory_format=fmt)
    step = session.prepare(step)  # DDP (student + the method's extras) when world > 1
    unwrapped = step.module if hasattr(step, "module") else step
    epochs = stage_epochs(cfg, stage)
    optimizer, scheduler = build_optimizer(step, cfg.optim, len(train_loader), epochs)

    run_dir = location(loop_config["run_dir"])  # a local folder or a storage URI
    hooks = worker_hooks(loop_config, rank)
    if rank == 0:
        checkpoints.clean_partial(run_dir)  # the previous attempt's rank 0 is gone
    # Every rank picks the same folder: the newest that passes its checks (then older ones).
    start_epoch, history, resume = 0, [], None
    # A mid-epoch checkpoint continues at its step only with the same ranks, batch and epoch length.
    layout = [world, train_loader.batch_size, len(train_loader)]
    found = checkpoints.latest(run_dir, with_state=True, map_location=device)
    if found:
        folder, manifest, state = found
        unwrapped.student.load_state_dict(state["model"])
        unwrapped.method.load_state_dict(state.get("method", {}))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], manifest.get("history", [])
        resume = resume_from(state, rank, world, layout, device)
        at = f" step {resume.step}" if resume else ""
        log.info(f"resuming {run_dir.name} from epoch {start_epoch + 1}{at} ({folder.name})")
    hooks.attempt(start_epoch + 1, unwrapped.method)

    def write_mid_epoch(epoch: int, position: dict, rng: dict) -> None:  # rank 0, in the epoch
        state = {
            "model": unwrapped.student.state_dict(), "method": unwrapped.method.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
            "epoch": epoch, "step": position["step"], "position": position, "stage": stage,
            "arch": arch, "classes": bundle.classes, "image_size": bundle.image_size,
            "norm": bundle.norm, "config": cfg.to_dict(),
        }  # "epoch": epochs done, as in an epoch's checkpoint; no report: no metrics row
        checkpoints.save(run_dir, state, history)
        prune_mid_epoch(run_dir, cfg.run.keep_checkpoints)

    # Also where a stop the driver asks for (Ctrl-C, SIGTERM: the stop file) checkpoints mid-epoch
    # when the epoch's rest would outlast run.stop_grace_s.
    stop_file = run_dir / STOP_FILE if loop_config.get("stop_file") else None
    mid_epoch = MidEpoch(cfg.run.checkpoint_every_s or math.inf, rank, device, layout, write_mid_epoch,
                         stop=stop_file and stop_file.exists, grace_s=cfg.run.stop_grace_s,
                         poll_s=1.0 if is_uri(run_dir) else 0.0,  # an object store: a request each
                         preempted=getattr(session, "preempted", None))

    steps_writer = step_writer(run_dir, rank)
    # This attempt's first report says when the loop started and how long its setup took (data,
    # cache, models, DDP, resume): where a short run's or a sweep trial's fixed time goes.
    setup = {"perf/setup_seconds": time.time() - entered, "perf/loop_started": entered}
    try:
        for epoch in range(start_epoch, epochs):
            position = resume if epoch == start_epoch else None  # steps done: skipped, not loaded
            sampler.set_epoch(epoch, skip=position.step * train_loader.batch_size if position else 0)
            mid_epoch.begin(epoch, position.step if position else 0)  # epochs done before this one
            progress = StepProgress(run_dir.name, epoch + 1, epochs, len(train_loader),
                                    train_loader.batch_size, world, cfg.run.progress_interval_s,
                                    scalar=steps_writer and steps_writer.add_scalar) if rank == 0 else None
            train_sums = train_one_epoch(
                step, hooks.loader(train_loader, epoch + 1, position.step if position else 0), optimizer,
                epoch=epoch + 1, device=device, teacher=teacher, scheduler=scheduler, amp=amp,
                channels_last=nhwc, clip_grad_norm=cfg.optim.clip_grad_norm, on_step=progress,
                resume=position, mid_epoch=mid_epoch,
            )
            if steps_writer is not None:
                steps_writer.flush()
            evaluation = dict(device=device, amp=amp, channels_last=nhwc, num_classes=bundle.num_classes)
            val_sums = evaluate_together(unwrapped.student, val_loader, evaluation)
            metrics = epoch_metrics(all_sum(train_sums, device), val_sums, bundle.num_classes)
            metrics.update(epoch=epoch + 1, epochs=epochs, lr=optimizer.param_groups[0]["lr"])
            if epoch + 1 == epochs and bundle.test is not None:  # the test split: read once, here
                test_loader = shard_loader(bundle.test, rank, world, val_loader.batch_size)
                metrics.update(split_metrics(evaluate_together(unwrapped.student, test_loader, evaluation),
                                             bundle.num_classes, "test"))
            history.append(metrics)
            state = {
                "model": unwrapped.student.state_dict(), "method": unwrapped.method.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1, "stage": stage, "arch": arch, "classes": bundle.classes,
                "image_size": bundle.image_size, "norm": bundle.norm, "config": cfg.to_dict(),
            }
            session.report({**metrics, **setup}, state if rank == 0 else None, run_dir, history)
            if rank == 0:  # the epoch's checkpoint supersedes its mid-epoch ones
                prune_mid_epoch(run_dir, cfg.run.keep_checkpoints)
            mid_epoch.restart()
            setup = {}  # the first report's only (not in the checkpoint's history)
            # After the checkpoint: a collapsed run keeps its epochs, and all ranks stop alike.
            check_collapse(history, cfg.guard, method=stage_method(cfg, stage), optim=cfg.optim,
                           steps_per_epoch=layout[2])
            if epoch + 1 < epochs and stop_requested(run_dir, device, world):
                log.info(f"stopping after epoch {epoch + 1} (Ctrl-C on the driver); checkpoint written")
                break
    except StopMidEpoch as stop:  # every rank, after the same step's checkpoint
        log.info(f"stopping in epoch {stop.epoch} after step {stop.step} (a stop asked for by the "
                 "driver); checkpoint written")
    except KdRayError as exc:
        # Every rank got here at the same check (engine.stop_together). Ending normally with the
        # error as the return value uses no Ray retry: a retry would fail the same way.
        return shared_error(exc, world)
    return None


def evaluate_together(model, loader, evaluation: dict) -> dict:
    """``evaluate`` on this rank's share, summed over ranks; a corrupt image stops every rank."""
    try:
        sums, error = evaluate(model, loader, **evaluation), None
    except KdRayError as exc:
        sums, error = None, exc
    stop_together(error, evaluation["device"])
    return all_sum(sums, evaluation["device"])


def step_writer(run_dir, rank: int):
    """Rank 0's TensorBoard writer for the step-level loss (<run>/tensorboard/steps, beside the
    controller's per-epoch scalars; run_dir is on storage every node shares, like checkpoints).
    None on object storage: event files are appended to, which an object store cannot do."""
    if rank != 0 or is_uri(run_dir):
        return None
    from torch.utils.tensorboard import SummaryWriter  # local: slow to import, rank 0 only

    return SummaryWriter(log_dir=str(run_dir / "tensorboard" / "steps"))


def stop_requested(run_dir, device, world: int) -> bool:
    """Whether the driver asked to stop (runs.files.STOP_FILE); every rank gets the same answer
    (any rank that saw the file counts), so no rank waits alone in the next epoch's collectives."""
    seen = torch.tensor([float((run_dir / STOP_FILE).exists())], device=device)
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(seen)
    return bool(seen.item() > 0)


def shared_error(exc: KdRayError, world: int) -> dict:
    """The lowest rank's own error (not a PeerFailedError) as a payload, the same on every rank."""
    mine = None if isinstance(exc, PeerFailedError) else to_payload(exc)
    errors = [mine] * world
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_gather_object(errors, mine)
    rank, payload = next(((r, e) for r, e in enumerate(errors) if e), (0, to_payload(exc)))
    return {**payload, "message": f"{payload['message']} (rank {rank})"}
