"""Test-only fault injection for the chaos suite (``scripts/chaos.py``, ``tests/test_chaos.py``).

kd_ray imports this module only when the driver's environment holds ``KD_RAY_FAULTS``, a JSON
object that ``cluster.stage.make_trainer`` copies into the workers' config; each worker then
uses ``Faults`` as its hooks (``cluster.worker.Hooks``)::

    {"dir": "/tmp/chaos/t1",
     "faults": [{"kind": "raise", "rank": 1, "epoch": 2, "step": 1, "once": true}]}

Kinds, each fired on ``rank`` just before training step ``step`` of ``epoch`` (1-based epoch):
``raise`` (a RuntimeError), ``kill`` (SIGKILL of the worker process), ``stall`` (sleep
``seconds``, default an hour, so the other ranks wait in a collective), ``sleep`` (the same, to
hold a run at a known point), ``nan`` (the batch's images become NaN), ``touch`` (create the file
``path``: a run's stop file, as the driver's Ctrl-C does). ``once``: only the first
time (a marker file in ``dir``), so a restarted attempt runs clean. Workers append what happened
(attempt starts, epoch starts, faults) to ``dir/events.jsonl``; the chaos suite reads its figures
from there.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import torch

ENV = "KD_RAY_FAULTS"
EVENTS = "events.jsonl"
KINDS = ("raise", "kill", "stall", "sleep", "nan", "touch")


def from_env() -> dict | None:
    """The fault plan in KD_RAY_FAULTS on the driver, checked; None when unset (every user run)."""
    text = os.environ.get(ENV)
    if not text:
        return None
    plan = json.loads(text)
    if not isinstance(plan, dict) or "dir" not in plan:
        raise ValueError(f"{ENV} must be a JSON object with 'dir' and 'faults'")
    for fault in plan.get("faults", []):
        if fault.get("kind") not in KINDS:
            raise ValueError(f"{ENV}: unknown fault kind {fault.get('kind')!r}; one of {KINDS}")
    return plan


def state_digest(state: dict) -> dict:
    """name -> SHA-256 of the tensor's bytes (on the CPU), 16 hex digits: event lines stay short."""
    return {name: hashlib.sha256(t.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]
            for name, t in state.items()}


def read_events(folder) -> list[dict]:
    path = Path(folder) / EVENTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Faults:
    """One worker's view of the plan: records events, fires the faults meant for its rank."""

    def __init__(self, plan: dict, rank: int):
        self.dir = Path(plan["dir"])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.faults = [f for f in plan.get("faults", []) if f.get("rank", 0) == rank]

    def event(self, name: str, **fields) -> None:
        row = {"event": name, "rank": self.rank, "pid": os.getpid(), "time": time.time(), **fields}
        with open(self.dir / EVENTS, "a") as out:  # one short line: appends do not interleave
            out.write(json.dumps(row) + "\n")

    def attempt(self, start_epoch: int, method=None) -> None:
        """Records the attempt and a digest of the method's state (a regressor restored on resume
        shows the checkpoint's digest, a re-initialised one does not)."""
        state = method.state_dict() if method is not None else {}
        self.event("attempt", start_epoch=start_epoch, method_state=state_digest(state))

    def loader(self, loader, epoch: int, start: int = 0):
        """``loader`` with the faults of ``epoch`` fired before their steps (the first is ``start``)."""
        return _FaultyLoader(self, loader, epoch, start)

    def before_step(self, epoch: int, step: int, batch):
        if step == 0:
            self.event("epoch_start", epoch=epoch)
        for index, fault in enumerate(self.faults):
            if fault.get("epoch", 1) != epoch or fault.get("step", 0) != step:
                continue
            marker = self.dir / f"fired-{self.rank}-{index}"
            if fault.get("once") and marker.exists():
                continue
            marker.touch()
            kind = fault["kind"]
            self.event("fault", kind=kind, epoch=epoch, step=step)
            if kind == "raise":
                raise RuntimeError(f"chaos: injected failure on rank {self.rank} at epoch {epoch} step {step}")
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind in ("stall", "sleep"):
                time.sleep(float(fault.get("seconds", 3600)))
            if kind == "touch":
                Path(fault["path"]).touch()
            if kind == "nan":
                batch = (torch.full_like(batch[0], float("nan")), *batch[1:])
        return batch


class _FaultyLoader:
    def __init__(self, faults: Faults, loader, epoch: int, start: int = 0):
        self.faults, self.loader, self.epoch, self.start = faults, loader, epoch, start

    def __len__(self):
        return len(self.loader)

    def __iter__(self):  # the loader's iterator now, as iter(loader) makes it (its RNG draw)
        if self.start:  # an attempt that continues inside the epoch (run.checkpoint_every_s)
            self.faults.event("epoch_resume", epoch=self.epoch, step=self.start)
        return self._batches(iter(self.loader))

    def _batches(self, batches):
        for step, batch in enumerate(batches, self.start):
            yield self.faults.before_step(self.epoch, step, batch)
