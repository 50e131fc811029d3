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

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from kd_ray.engine.loaders import all_sum
from kd_ray.engine.loop import stop_together
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


class MidEpoch:
    """Rank 0's clock and every rank's part in writing a mid-epoch checkpoint.

    ``write(epoch, position, rng)`` (``epoch``: epochs done, which the caller sets) runs on rank 0 only and writes the checkpoint (it may raise a
    KdRayError, e.g. a full disk: then every rank stops alike, as after an epoch's report).
    """

    def __init__(self, every_s: float, rank: int, device: torch.device, layout: list,
                 write: Callable[[dict, dict], None], clock: Callable[[], float] = time.monotonic):
        self.every_s, self.rank, self.device, self.layout = every_s, rank, device, layout
        self.write, self.clock = write, clock
        self.last = clock()
        self.epoch = 0

    def restart(self) -> None:
        """An epoch's checkpoint was just written: the next one is due every_s from now."""
        self.last = self.clock()

    def due(self) -> bool:
        """Rank 0's wish (the others never ask; stop_together shares rank 0's)."""
        return self.rank == 0 and self.clock() - self.last >= self.every_s

    def save(self, step: int, sums: dict) -> None:
        """Every rank calls this after the same step (``step`` steps of the epoch done)."""
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
