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


def run_rank(rank, port, cases, out):
    """Each case ``(bad, check_every)`` in turn, in one process group (the ranks stop together
    after each, so the next starts in step); writes rank<r>-<case>.json."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
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
