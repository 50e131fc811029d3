"""Driver-side logging: TensorBoard scalars, metrics.jsonl, failures.jsonl and (run.tracker=mlflow)
MLflow metrics, once per epoch.

Ray Train runs a ``UserCallback`` in its controller process, which Ray places on the driver's
node, so these files gather on the head node even when the workers sit on other nodes.
One point per epoch, also across restarts: an epoch already in metrics.jsonl is not written
again, and epochs whose line was lost (driver killed between checkpoint and line) are written
back from the checkpoint's history before training resumes (``runs.files.backfill``).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import ray
import ray.util
from ray.train import UserCallback

from kd_ray.errors import describe
from kd_ray.runs.files import (append_failure, append_metrics, checkpoint_history, push_tensorboard,
                               tensorboard_dir, write_scalars, written_epochs)


class MetricsCallback(UserCallback):
    def __init__(self, run_dir: str, tensorboard: bool = True, tracker=None):
        self.run_dir = run_dir
        self.tracker = tracker  # runs.tracking.StageTracker with run.tracker=mlflow
        self.tensorboard = tensorboard  # off in Tune trials: the Tuner's TBX logger writes them
        self._writer = None
        self._written = None  # epochs already in metrics.jsonl (read in the controller)

    def _tb(self):
        if self._writer is None:  # created lazily: the callback is pickled to the controller
            from torch.utils.tensorboard import SummaryWriter  # local: only the controller writes

            folder = tensorboard_dir(self.run_dir, fetch=True)  # on this (the head) node
            self._writer = SummaryWriter(log_dir=str(folder))
            write_writer_info(folder)
        return self._writer

    def after_report(self, run_context, metrics, checkpoint):
        row = dict(metrics[0])  # rank 0; counters were already summed across ranks
        # Earlier epochs whose report was lost in a restart (a checkpoint written, the worker gone
        # before Ray took the report) come from this checkpoint's history, in order.
        self.write_rows(row, checkpoint_history(checkpoint))

    def write_rows(self, row: dict, history: list) -> None:
        """This epoch's report, after the epochs of ``history`` (a checkpoint's) not written yet."""
        if self._written is None:
            self._written = written_epochs(self.run_dir)
        current = int(row.get("epoch", 0))
        lost = [h for h in history if int(h.get("epoch", 0)) < current]
        for earlier in [*lost, row]:  # the report itself for its own epoch (it has more keys)
            epoch = int(earlier.get("epoch", 0))
            if epoch in self._written:
                continue  # trained again after a restart: keep one point per epoch
            if self.tensorboard:
                write_scalars(self._tb(), earlier)
            append_metrics(self.run_dir, earlier)
            if self.tracker is not None:
                self.tracker.log_epoch(earlier)
            self._written.add(epoch)
        if self.tensorboard:
            push_tensorboard(self.run_dir)  # storage URI: copy the event files there

    def close(self) -> None:
        """Flush and close the TensorBoard writer (a single-process run's last step)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def after_exception(self, run_context, worker_exceptions):
        if self._writer is not None:
            self._writer.flush()
        append_failure(self.run_dir, {str(rank): describe(error)
                                      for rank, error in sorted(worker_exceptions.items())})


def write_writer_info(folder: Path) -> None:
    """Record which node and process writes the TensorBoard files (the head, for cluster jobs)."""
    # Only when connected: get_runtime_context() would otherwise start a local instance of its own.
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    info = {"node_id": node_id, "hostname": socket.gethostname(),
            "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}
    (folder / "writer.json").write_text(json.dumps(info))
