"""The files a run leaves beside its checkpoints: metrics.jsonl (one line per epoch), failures.jsonl
(one line per failed attempt), summary.json, TensorBoard scalars. Readers and writers, no Ray.

``run_dir`` may be a local folder or a storage URI (kd_ray.storage). TensorBoard's event files are
always written to a local folder on the head node (``tensorboard_dir``) and, for a URI, copied to
``<run>/tensorboard`` after each epoch (``push_tensorboard``)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from kd_ray.engine.checkpoints import MANIFEST, BadCheckpoint, folders, read_manifest
from kd_ray.storage import append_text, download, is_uri, local_mirror, location, rmtree, upload

METRICS_FILE = "metrics.jsonl"
FAILURES_FILE = "failures.jsonl"  # one line per failed attempt: time and each rank's error
SUMMARY_FILE = "summary.json"
STOP_FILE = ".stop"  # the driver's first Ctrl-C: every rank stops after the epoch's checkpoint
# In an attempt's first report only (its start and setup time): not per-epoch curves
ATTEMPT_KEYS = ("perf/loop_started", "perf/setup_seconds")
NOT_SCALARS = ("epoch", "epochs", "time", *ATTEMPT_KEYS)  # what TensorBoard does not plot
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the checkpoints it knows


def checkpoint_history(checkpoint) -> list:
    """Per-epoch metrics kept in a checkpoint's manifest (empty when there is none to read)."""
    try:
        path = checkpoint.path
        fs = getattr(checkpoint, "filesystem", None)
        if fs is not None and fs.type_name != "local":  # Ray's persisted copy on an object store
            with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
                return json.loads(f.read()).get("history", [])
        return json.loads((Path(path) / MANIFEST).read_text()).get("history", [])
    except (AttributeError, TypeError, OSError, ValueError):
        return []


def write_scalars(writer, row: dict) -> None:
    """One TensorBoard point per metric; the step is the epoch."""
    epoch = int(row.get("epoch", 0))
    for key, value in row.items():
        if key not in NOT_SCALARS and isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(key, value, global_step=epoch)
    writer.flush()


def append_metrics(run_dir, row: dict) -> None:
    row = {**row, "time": time.time()}
    append_text(location(run_dir) / METRICS_FILE, json.dumps(row) + "\n")


def written_epochs(run_dir) -> set:
    path = location(run_dir) / METRICS_FILE
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
        folder = tensorboard_dir(run_dir, fetch=True)
        logged = tensorboard_epochs(folder)
        rows = [row for row in history if row.get("epoch") not in logged]
        if rows:
            from torch.utils.tensorboard import SummaryWriter  # local: slow, rarely needed

            with SummaryWriter(log_dir=str(folder)) as writer:
                for row in rows:
                    write_scalars(writer, row)
            push_tensorboard(run_dir)
    return missing


def tensorboard_dir(run_dir, fetch: bool = False) -> Path:
    """The local folder TensorBoard writes to: ``<run>/tensorboard``, or for a storage URI its
    mirror on this node (``fetch``: filled from storage first when empty, e.g. on a new head)."""
    if not is_uri(run_dir):
        return Path(run_dir) / "tensorboard"
    folder = local_mirror(run_dir) / "tensorboard"
    remote = location(run_dir) / "tensorboard"
    if fetch and not folder.is_dir() and remote.is_dir():
        download(remote, folder)
    return folder


def push_tensorboard(run_dir) -> None:
    """Copy the local TensorBoard files to storage (a no-op for a local run)."""
    if is_uri(run_dir) and tensorboard_dir(run_dir).is_dir():
        upload(tensorboard_dir(run_dir), location(run_dir) / "tensorboard")


def tensorboard_epochs(folder: Path) -> set:
    """Steps (epochs) with a scalar in the event files of ``folder``."""
    if not folder.is_dir():
        return set()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # local: slow

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {event.step for tag in acc.Tags()["scalars"] for event in acc.Scalars(tag)}


def read_failures(run_dir) -> list[dict]:
    path = location(run_dir) / FAILURES_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_failure(run_dir, errors: dict) -> None:
    append_text(location(run_dir) / FAILURES_FILE, json.dumps({"time": time.time(), "errors": errors}) + "\n")


def read_history(run_dir) -> list[dict]:
    """Per-epoch metrics written by the callback; a resumed run's later lines win."""
    path = location(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    by_epoch = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_epoch[row["epoch"]] = row
    return [by_epoch[e] for e in sorted(by_epoch)]


def finished_summary(run_dir, epochs: int) -> dict | None:
    """The summary of a run that already trained ``epochs`` epochs, else None."""
    path = location(run_dir) / SUMMARY_FILE
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except ValueError:  # cut short (a driver killed while writing it): written again
            return None
        if isinstance(summary, dict) and summary.get("epochs", 0) >= epochs:
            return summary
    return None


def prune_checkpoints(run_dir, keep: int, protect=None) -> list[Path]:
    """Remove checkpoints beyond the newest ``keep`` that Ray's snapshot does not list.

    Ray deletes the old checkpoints it was told of (``num_to_keep``); a checkpoint written by an
    attempt or a driver that died before Ray recorded it is ours to delete. Those Ray lists
    must stay: Ray refuses to resume a run whose snapshot names a missing folder.
    """
    snapshot = location(run_dir) / RAY_SNAPSHOT  # Ray's run folder is the run folder (stage.ray_names)
    known = snapshot.read_text() if snapshot.is_file() else ""
    removed = []
    for folder in folders(run_dir)[keep:]:
        if folder.name in known or (protect is not None and str(folder) == str(protect)):
            continue
        rmtree(folder)  # a local folder or a prefix in object storage
        removed.append(folder)
    return removed


def prune_mid_epoch(run_dir, keep: int) -> list[Path]:
    """Remove mid-epoch checkpoints (run.checkpoint_every_s) beyond the newest ``keep`` and those
    older than the newest epoch checkpoint, which supersedes them. Epoch checkpoints are never
    touched here: Ray may know them before its snapshot says so (see prune_checkpoints)."""
    removed, mid, epoch_seen = [], 0, False
    for folder in folders(run_dir):
        try:
            is_mid = "step" in read_manifest(folder)
        except BadCheckpoint:
            continue  # a copy still arriving, or a damaged one: resume skips it, the run's end prunes it
        if not is_mid:
            epoch_seen = True
            continue
        mid += 1
        if epoch_seen or mid > keep:
            rmtree(folder)
            removed.append(folder)
    return removed
