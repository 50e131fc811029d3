"""Progress inside an epoch: a console line every ``interval`` seconds (images done of total,
images/s, ETA) and a step-level loss curve, both from one rank.

Called after every optimizer step, it costs a clock read; the loss is read from the device (one
wait for the GPU) only every ``every`` steps for the curve and when a line is due.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from kd_ray.log import get

log = get(__name__)


class StepProgress:
    """``hook(step, images, loss)`` for ``train_one_epoch(on_step=...)``.

    ``steps``: steps in this epoch; ``world``: ranks, each doing the same number of images (the
    counts shown are this rank's times ``world``). ``scalar(tag, value, global_step)``: where the
    step-level loss goes (a TensorBoard writer's add_scalar), or None.
    """

    def __init__(self, label: str, epoch: int, epochs: int, steps: int, batch: int, world: int = 1,
                 interval: float = 30.0, every: int = 20, scalar: Optional[Callable] = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.label, self.epoch, self.epochs, self.steps = label, epoch, epochs, steps
        self.total = steps * batch * world
        self.world, self.interval, self.every, self.scalar, self.clock = world, interval, every, scalar, clock
        self.start = self.last = clock()
        self.lines = 0

    def __call__(self, step: int, images: int, loss) -> None:
        global_step = (self.epoch - 1) * self.steps + step
        if self.scalar is not None and step % self.every == 0:
            self.scalar("train_step/loss", float(loss), global_step)
        now = self.clock()
        if now - self.last < self.interval or step + 1 >= self.steps:
            return  # the epoch's own line follows the last step
        self.last = now
        done, elapsed = images * self.world, now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        self.lines += 1
        log.info(f"{self.label} epoch {self.epoch}/{self.epochs} | {done:,}/{self.total:,} images "
                 f"({100 * done / max(self.total, 1):.0f}%) | {rate:.0f} img/s | loss "
                 f"{float(loss):.4f} | ETA {_clock(eta)}")


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
