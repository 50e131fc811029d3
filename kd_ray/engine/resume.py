"""Checkpoints inside an epoch (``run.checkpoint_every_s``) and resuming at their step.

When: rank 0 alone reads the clock, and its wish rides on the all-reduce that train_one_epoch
already makes every ``check_every`` steps (``stop_together``), so every rank saves after the same
step at no extra collective; a single process checks every step on CPU. What: the epoch's
position (steps done, the epoch's train sums so far, added over ranks; the layout they belong to)
and every rank's RNG states, beside the usual model, method, optimizer and schedule. A resumed
epoch skips its first steps in the sampler (same order, no image loaded), restores the RNG
states once the loader's iterator exists, and starts its sums from the saved ones (on rank 0;
the others from zero, so the epoch's all-reduce gives the whole epoch's totals).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from kd_ray.engine.loaders import all_sum
from kd_ray.engine.loop import SAVE, STOP, stop_together
from kd_ray.errors import KdRayError
from kd_ray.log import get

log = get(__name__)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rng_states(device: torch.device) -> dict:
    """Every rank's CPU (and CUDA) generator state, gathered (a collective when world > 1)."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    world = _world()
    if world == 1:
        return {k: [v] for k, v in mine.items()}
    out = {}
    for key, state in mine.items():  # uint8 tensors of one size on every rank (gloo and NCCL)
        parts = [torch.empty_like(state, device=device) for _ in range(world)]
        dist.all_gather(parts, state.to(device))
        out[key] = [p.cpu() for p in parts]
    return out


def restore_rng(states: Optional[dict], rank: int, world: int, device: torch.device) -> None:
    """Set this rank's generators to the saved ones (skipped, with a warning, if the number of
    ranks changed: the epoch then goes on with other random draws)."""
    if not states:
        return
    if len(states.get("cpu", [])) != world:
        log.warning(f"the checkpoint's RNG states are of {len(states.get('cpu', []))} rank(s), this run "
                    f"has {world}: the resumed epoch draws other random numbers (augmentation, dropout)")
        return
    torch.set_rng_state(states["cpu"][rank].cpu())
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"][rank].cpu(), device)


@dataclass
class Resume:
    """Where train_one_epoch continues an epoch: after ``step`` steps, from ``sums`` (this rank's
    share of the epoch's sums so far), calling ``restore`` once the loader's iterator exists (the
    DataLoader draws its base seed then, as it did in the interrupted run)."""

    step: int
    sums: dict = field(default_factory=dict)
    restore: Optional[Callable[[], None]] = None


def resume_from(state: dict, rank: int, world: int, layout: list, device: torch.device) -> Optional[Resume]:
    """The Resume of a mid-epoch checkpoint's state (None for an epoch checkpoint)."""
    position = state.get("position")
    if not position:
        return None
    step, steps = int(position["step"]), layout[2]
    if list(position.get("layout", [])) != list(layout):
        log.warning(f"the checkpoint was written with {position.get('layout')} (ranks, images per rank "
                    f"and step, steps per epoch), this run has {layout}: it continues at step "
                    f"{min(step, steps - 1)} of the new order, so some of the epoch's images are seen "
                    "twice and others not at all")
        step = max(0, min(step, steps - 1))
    sums = dict(position["sums"]) if rank == 0 else {k: 0 * v for k, v in position["sums"].items()}
    rng = state.get("rng")
    return Resume(step, sums, lambda: restore_rng(rng, rank, world, device))


class StopMidEpoch(Exception):
    """Every rank stops after a mid-epoch checkpoint the driver asked for (not an error)."""

    def __init__(self, epoch: int, step: int):
        super().__init__(f"stopped in epoch {epoch} after step {step}")
        self.epoch, self.step = epoch, step


class MidEpoch:
    """Rank 0's clock and every rank's part in writing a mid-epoch checkpoint.

    ``write(epoch, position, rng)`` (``epoch``: epochs done, which the caller sets) runs on rank 0
    only and writes the checkpoint (it may raise a KdRayError, e.g. a full disk: then every rank
    stops alike, as after an epoch's report). ``stop()`` (rank 0):
    whether the driver asked to stop (polled at most every ``poll_s``); then, if the epoch's remaining steps at this epoch's pace
    would take longer than ``grace_s`` from the request, the checkpoint is written now and every
    rank stops (StopMidEpoch); otherwise the epoch ends and its checkpoint is the stop's.
    ``preempted()`` (rank 0): whether Ray announced that a node of the run is being drained; the
    first time, a checkpoint is written now and training goes on until Ray restarts the group.
    """

    def __init__(self, every_s: float, rank: int, device: torch.device, layout: list,
                 write: Callable[[int, dict, dict], None], clock: Callable[[], float] = time.monotonic,
                 stop: Optional[Callable[[], bool]] = None, grace_s: float = math.inf, poll_s: float = 0.0,
                 preempted: Optional[Callable[[], bool]] = None):
        self.every_s, self.rank, self.device, self.layout = every_s, rank, device, layout
        self.write, self.clock, self.stop, self.grace_s, self.poll_s = write, clock, stop, grace_s, poll_s
        self.last = self.started = clock()
        self.epoch = self.first = 0
        self.stop_seen: Optional[float] = None
        self.preempted, self.preempt_saved = preempted, False
        self.polled = -math.inf

    def restart(self) -> None:
        """An epoch's checkpoint was just written: the next one is due every_s from now."""
        self.last = self.clock()

    def begin(self, epoch: int, first: int = 0) -> None:
        """An epoch starts (``epoch`` done before it) at step ``first``: its pace is timed from now."""
        self.epoch, self.first, self.started = epoch, first, self.clock()

    def due(self, done: int = 0, steps: int = 0) -> int:
        """Rank 0's wish after ``done`` of the epoch's ``steps`` steps: 0, SAVE or STOP (the others
        never ask; stop_together shares rank 0's)."""
        if self.rank != 0:
            return 0
        now = self.clock()
        if self._stop_now(now, done, steps):
            return STOP
        if self.preempted is not None and not self.preempt_saved and self.preempted():
            self.preempt_saved = True  # once: Ray restarts the group from it when the node goes
            log.warning(f"a node of this run is being drained (preemption notice): checkpoint now, "
                        f"after step {done} of epoch {self.epoch + 1}")
            return SAVE
        return SAVE if now - self.last >= self.every_s else 0

    def _stop_now(self, now: float, done: int, steps: int) -> bool:
        if self.stop is None:
            return False
        if self.stop_seen is None:
            if now - self.polled < self.poll_s:
                return False
            self.polled = now
            if not self.stop():
                return False
            self.stop_seen = now
        pace = (now - self.started) / max(done - self.first, 1)
        return (steps - done) * pace > self.grace_s - (now - self.stop_seen)

    def save(self, step: int, sums: dict, stop: bool = False) -> None:
        """Every rank calls this after the same step (``step`` steps of the epoch done); with
        ``stop``, every rank then raises StopMidEpoch."""
        totals = all_sum(sums, self.device)
        rng = rng_states(self.device)
        error = None
        if self.rank == 0:
            try:
                self.write(self.epoch, {"step": step, "sums": totals, "layout": self.layout}, rng)
            except KdRayError as exc:  # a full disk: no rank goes on to wait alone in a collective
                error = exc
        stop_together(error, self.device)
        self.restart()
        if stop:
            raise StopMidEpoch(self.epoch + 1, step)
