"""Driver-side logging: TensorBoard scalars, metrics.jsonl and a progress line per epoch.

Ray Train runs a ``UserCallback`` in its controller process, which Ray places on the driver's
node, so these files gather on the head node even when the workers sit on other nodes.
"""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

from ray.train import UserCallback


class MetricsCallback(UserCallback):
    def __init__(self, run_dir: str, tensorboard: bool = True):
        self.run_dir = run_dir
        self.tensorboard = tensorboard  # off in Tune trials: the Tuner's TBX logger writes them
        self._writer = None

    def _tb(self):
        if self._writer is None:  # created lazily: the callback is pickled to the controller
            from torch.utils.tensorboard import SummaryWriter

            folder = Path(self.run_dir) / "tensorboard"
            self._writer = SummaryWriter(log_dir=str(folder))
            write_writer_info(folder)
        return self._writer

    def after_report(self, run_context, metrics, checkpoint):
        row = dict(metrics[0])  # rank 0; counters were already summed across ranks
        epoch = int(row.get("epoch", 0))
        if self.tensorboard:
            writer = self._tb()
            for key, value in row.items():
                if key not in ("epoch", "epochs") and isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(key, value, global_step=epoch)
            writer.flush()
        row["time"] = time.time()
        with open(Path(self.run_dir) / "metrics.jsonl", "a") as out:
            out.write(json.dumps(row) + "\n")

    def after_exception(self, run_context, worker_exceptions):
        if self._writer is not None:
            self._writer.flush()


def write_writer_info(folder: Path) -> None:
    """Record which node and process writes the TensorBoard files (the head, for cluster jobs)."""
    import os
    import socket

    import ray

    info = {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
            "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}
    (folder / "writer.json").write_text(json.dumps(info))


class ProgressPrinter:
    """Prints each new line of metrics.jsonl on the driver while ``fit()`` blocks."""

    def __init__(self, run_dir, label: str, interval: float = 0.5):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.label = label
        self.interval = interval
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._print_new()

    def _run(self):
        while not self._stop.wait(self.interval):
            self._print_new()

    def _print_new(self):
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self._offset)
            text = f.read()
        complete = text[: text.rfind("\n") + 1]
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            if line.strip():
                print(progress_line(self.label, json.loads(line)), flush=True)


def progress_line(label: str, row: dict) -> str:
    parts = [f"[kd_ray] {label} epoch {row.get('epoch')}/{row.get('epochs')}",
             f"train loss {row.get('train/loss', float('nan')):.4f}",
             f"val loss {row.get('val/loss', float('nan')):.4f}",
             f"top1 {100 * row.get('val/top1', float('nan')):.2f}%"]
    if "val/top5" in row:
        parts.append(f"top5 {100 * row['val/top5']:.2f}%")
    parts.append(f"{row.get('perf/images_per_s', 0):.0f} img/s")
    parts.append(f"{row.get('perf/epoch_seconds', 0):.1f}s")
    return " | ".join(parts)
