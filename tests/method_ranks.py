"""Two real gloo ranks running cluster.worker.train_loop (what every Ray Train worker runs) with a
session of their own, for tests/test_features_ray.py: a method's extras saved by rank 0 and
restored on both ranks at a resume, without a Ray Train run's start-up of about 20 CPU seconds
(the fitnets test there keeps the whole Ray path: a SIGKILLed driver, Train's restart)."""
import datetime
import json
import os
import traceback

import torch
import torch.distributed as dist

from kd_ray.cluster.callbacks import MetricsCallback
from kd_ray.cluster.worker import train_loop
from kd_ray.engine import checkpoints
from kd_ray.runs.files import prune_checkpoints


class GlooSession:
    """worker.train_loop's side on a plain process group: DDP, and rank 0 writes the checkpoint
    and metrics.jsonl as Ray Train's report and our controller callback do; a barrier after."""

    device = torch.device("cpu")

    def __init__(self, rank: int, run_dir: str, keep: int):
        self.rank, self.world, self.keep = rank, dist.get_world_size(), keep
        self.metrics = MetricsCallback(run_dir, tensorboard=False) if rank == 0 else None

    def prepare(self, model):
        return torch.nn.parallel.DistributedDataParallel(model)

    def report(self, metrics: dict, state: dict | None, run_dir, history: list) -> None:
        if self.rank == 0:
            checkpoints.save(run_dir, state, history)
            prune_checkpoints(run_dir, self.keep)
            self.metrics.write_rows(metrics, history)
        dist.barrier()


def run_jobs(rank: int, init_method: str, jobs: list, out: str) -> None:
    """Each loop config of ``jobs`` in turn on this rank; writes rank<r>-<i>.json (error or none)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    for i, loop_config in enumerate(jobs):
        keep = loop_config["config"]["run"]["keep_checkpoints"]
        try:
            returned = train_loop(loop_config, GlooSession(rank, loop_config["run_dir"], keep))
            error = json.dumps(returned) if returned else ""
        except Exception:
            error = traceback.format_exc()
        with open(os.path.join(out, f"rank{rank}-{i}.json"), "w") as f:
            json.dump({"error": error}, f)
    dist.destroy_process_group()
