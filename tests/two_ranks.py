"""Two real gloo ranks training with DDP, for tests/test_recovery.py (kept apart from it so that
the spawned processes import torch and the engine only, not Ray)."""
import datetime
import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kd_ray.engine import train_one_epoch
from kd_ray.errors import DataError
from kd_ray.methods import TrainStep, loss_method


class Batches:
    """8 steps of 4 images; ``bad`` = (step, kind) on this rank: a DataError or a NaN loss."""

    def __init__(self, bad=None):
        self.bad = bad

    def __len__(self):
        return 8

    def __iter__(self):
        for step in range(8):
            if self.bad == (step, "data"):
                raise DataError(f"cannot read image bad{step}.png")
            x = torch.full((4, 3), math.nan) if self.bad == (step, "nan") else torch.randn(4, 3)
            yield x, torch.zeros(4, dtype=torch.long)


def run_rank(rank, init_method, cases, out):
    """Each case ``(bad, check_every)`` in turn, in one process group (the ranks stop together
    after each, so the next starts in step); writes rank<r>-<case>.json."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    for case, (bad, check_every) in enumerate(cases):
        torch.manual_seed(0)
        steps = []

        def loss(s, t, labels, cfg):
            steps.append(len(steps))
            return {"loss": F.cross_entropy(s, labels)}

        model = torch.nn.parallel.DistributedDataParallel(TrainStep(torch.nn.Linear(3, 2), loss_method(loss)))
        try:
            train_one_epoch(model, Batches(bad if rank == 1 else None),
                            torch.optim.SGD(model.parameters(), lr=0.1), epoch=2,
                            device=torch.device("cpu"), check_every=check_every)
            result = ["none", ""]
        except Exception as exc:
            result = [type(exc).__name__, str(exc)]
        with open(os.path.join(out, f"rank{rank}-{case}.json"), "w") as f:
            json.dump({"error": result, "steps": len(steps)}, f)
    dist.destroy_process_group()


class NoisyBatches:
    """8 steps of 4 images from steps ``start`` on; each batch draws noise from torch's RNG as an
    augmentation would (rank 1 twice as much, so the ranks' generators differ)."""

    def __init__(self, rank, start=0):
        self.rank, self.start = rank, start
        gen = torch.Generator().manual_seed(10 + rank)
        self.x, self.y = torch.randn(8, 4, 3, generator=gen), torch.randint(0, 2, (8, 4), generator=gen)

    def __len__(self):
        return 8 - self.start

    def __iter__(self):
        for step in range(self.start, 8):
            for _ in range(self.rank + 1):
                noise = torch.randn(4, 3) * 0.1
            yield self.x[step] + noise, self.y[step]


def run_mid_epoch(rank, init_method, out):
    """One epoch uninterrupted, saving mid-epoch (rank 0 wants to at every check, every 4 steps);
    then the epoch again from the last mid-epoch checkpoint; both results to rank<r>-mid.json."""
    from kd_ray.engine.loaders import all_sum
    from kd_ray.engine.resume import MidEpoch, resume_from

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    device, saved, saves = torch.device("cpu"), os.path.join(out, "mid.pt"), []

    def ce(s, t, labels, cfg):
        return {"loss": F.cross_entropy(s, labels)}

    def build():
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(TrainStep(torch.nn.Linear(3, 2), loss_method(ce)))
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    model, opt = build()

    def write(epoch, position, rng):  # rank 0 only
        torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict(), "rng": rng,
                    "position": position}, saved)

    class Recorded(MidEpoch):
        def save(self, step, sums, stop=False):
            saves.append(step)
            super().save(step, sums, stop)

    mid = Recorded(1e-9, rank, device, [2, 4, 8], write)
    torch.manual_seed(100)  # the epoch's draws
    whole = all_sum(train_one_epoch(model, NoisyBatches(rank), opt, epoch=1, device=device,
                                    check_every=4, mid_epoch=mid), device)
    weights = [p.tolist() for p in model.module.parameters()]
    dist.barrier()
    state = torch.load(saved, weights_only=True)
    model, opt = build()
    model.module.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    resume = resume_from(state, rank, 2, [2, 4, 8], device)
    torch.manual_seed(7)  # whatever the attempt drew before: the saved states replace it
    again = all_sum(train_one_epoch(model, NoisyBatches(rank, resume.step), opt, epoch=1, device=device,
                                    check_every=4, resume=resume), device)
    with open(os.path.join(out, f"rank{rank}-mid.json"), "w") as f:
        json.dump({"saves": saves, "step": resume.step, "whole": whole, "again": again, "weights": weights,
                   "weights_again": [p.tolist() for p in model.module.parameters()],
                   "wrote": os.path.exists(saved)}, f)
    dist.destroy_process_group()
