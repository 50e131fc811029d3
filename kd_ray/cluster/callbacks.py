"""Driver-side logging: TensorBoard scalars, metrics.jsonl, failures.jsonl, a line per epoch.

Ray Train runs a ``UserCallback`` in its controller process, which Ray places on the driver's
node, so these files gather on the head node even when the workers sit on other nodes.
One point per epoch, also across restarts: an epoch already in metrics.jsonl is not written
again, and epochs whose line was lost (driver killed between checkpoint and line) are written
back from the checkpoint's history before training resumes (``backfill``).
"""
from __future__ import annotations

import json
import math
import re
import threading
import time
from pathlib import Path

from ray.train import UserCallback


METRICS_FILE = "metrics.jsonl"
FAILURES_FILE = "failures.jsonl"  # one line per failed attempt: time and each rank's error


class MetricsCallback(UserCallback):
    def __init__(self, run_dir: str, tensorboard: bool = True):
        self.run_dir = run_dir
        self.tensorboard = tensorboard  # off in Tune trials: the Tuner's TBX logger writes them
        self._writer = None
        self._written = None  # epochs already in metrics.jsonl (read in the controller)

    def _tb(self):
        if self._writer is None:  # created lazily: the callback is pickled to the controller
            from torch.utils.tensorboard import SummaryWriter

            folder = Path(self.run_dir) / "tensorboard"
            self._writer = SummaryWriter(log_dir=str(folder))
            write_writer_info(folder)
        return self._writer

    def after_report(self, run_context, metrics, checkpoint):
        if self._written is None:
            self._written = written_epochs(self.run_dir)
        row = dict(metrics[0])  # rank 0; counters were already summed across ranks
        # Earlier epochs whose report was lost in a restart (a checkpoint written, the worker gone
        # before Ray took the report) come from this checkpoint's history, in order.
        for earlier in [*checkpoint_history(checkpoint), row]:
            epoch = int(earlier.get("epoch", 0))
            if epoch in self._written or epoch > int(row.get("epoch", 0)):
                continue  # trained again after a restart: keep one point per epoch
            if self.tensorboard:
                write_scalars(self._tb(), earlier)
            append_metrics(self.run_dir, earlier)
            self._written.add(epoch)

    def after_exception(self, run_context, worker_exceptions):
        if self._writer is not None:
            self._writer.flush()
        errors = {str(rank): describe_error(error) for rank, error in sorted(worker_exceptions.items())}
        with open(Path(self.run_dir) / FAILURES_FILE, "a") as out:
            out.write(json.dumps({"time": time.time(), "errors": errors}) + "\n")


def checkpoint_history(checkpoint) -> list:
    """Per-epoch metrics kept in a checkpoint's manifest (empty when there is none to read)."""
    from kd_ray.checkpoints import MANIFEST

    try:
        return json.loads((Path(checkpoint.path) / MANIFEST).read_text()).get("history", [])
    except (AttributeError, TypeError, OSError, ValueError):
        return []


def write_scalars(writer, row: dict) -> None:
    """One TensorBoard point per metric; the step is the epoch."""
    epoch = int(row.get("epoch", 0))
    for key, value in row.items():
        if key not in ("epoch", "epochs", "time") and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(key, value, global_step=epoch)
    writer.flush()


def append_metrics(run_dir, row: dict) -> None:
    row = {**row, "time": time.time()}
    with open(Path(run_dir) / METRICS_FILE, "a") as out:
        out.write(json.dumps(row) + "\n")


def written_epochs(run_dir) -> set:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return set()
    return {json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()}


def backfill(run_dir, history: list, tensorboard: bool = True) -> list:
    """Write the epochs of a checkpoint's ``history`` that metrics.jsonl or TensorBoard lack.

    Returns the rows missing from metrics.jsonl. Each file is checked on its own: the driver
    may have died between writing one and the other.
    """
    have = written_epochs(run_dir)
    missing = [row for row in history if row.get("epoch") not in have]
    for row in missing:
        append_metrics(run_dir, row)
    if tensorboard:
        folder = Path(run_dir) / "tensorboard"
        logged = tensorboard_epochs(folder)
        rows = [row for row in history if row.get("epoch") not in logged]
        if rows:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(log_dir=str(folder)) as writer:
                for row in rows:
                    write_scalars(writer, row)
    return missing


def tensorboard_epochs(folder: Path) -> set:
    """Steps (epochs) with a scalar in the event files of ``folder``."""
    if not folder.is_dir():
        return set()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {event.step for tag in acc.Tags()["scalars"] for event in acc.Scalars(tag)}


def read_failures(run_dir) -> list[dict]:
    path = Path(run_dir) / FAILURES_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def describe_error(error: BaseException) -> str:
    """``Type: last line`` of the innermost error inside Ray's wrappers."""
    while (getattr(error, "cause", None) or error.__cause__) is not None:
        error = getattr(error, "cause", None) or error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    name = type(error).__name__.replace("RayTaskError(", "").rstrip(")")
    last = re.sub(r"^\[[^\]]*\]\s*", "", lines[-1] if lines else "")  # gloo's "[/path/file.cc:545] "
    if len(last) > 300:  # Ray's actor-death messages run to a paragraph
        last = last[:297] + "..."
    return last if last.startswith(name) else f"{name}: {last}"


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
