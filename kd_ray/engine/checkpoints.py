"""Epoch checkpoints: written atomically, checked on load, older ones used when the newest is bad.

A checkpoint is a folder ``<run>/checkpoint_<time>/`` with ``state.pt`` (tensors and plain numbers
only: model, method, optimizer and schedule state) and ``manifest.json`` (everything else: epoch,
stage, arch, classes, image size, config, the byte size of state.pt and every epoch's metrics so
far). state.pt is read with ``torch.load(weights_only=True)``: storage that others can write to
must not be able to run code in ours, so a pickled object in it is refused, never unpickled.

Rank 0 writes both into ``.tmp_checkpoint_<time>/`` and renames the folder when they are
complete: a writer killed half-way leaves no folder under a checkpoint name, and a file cut short
later (full disk, a bad copy) fails the size check. On object storage (``run_dir`` a URI), where
nothing renames, the folder is written locally and then copied (by Ray's storage layer in the
workers; by ``save``, manifest last, elsewhere); a copy cut short fails the same checks.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Callable

import torch

from kd_ray.errors import DiskFullError, first_line
from kd_ray.log import get
from kd_ray.storage import is_uri, location, open_bytes, upload

log = get(__name__)

STATE_FILE = "state.pt"
MANIFEST = "manifest.json"
PREFIX = "checkpoint_"
TMP = ".tmp_"
# state.pt; the rest goes to the manifest ("rng": each rank's generator states, mid-epoch only)
TENSOR_KEYS = ("model", "method", "optimizer", "scheduler", "rng")


class BadCheckpoint(Exception):
    """A checkpoint folder that is incomplete, truncated or unreadable."""


def new_name() -> str:
    """Ray's own naming (checkpoint_<local time, microseconds>), so names sort by age."""
    return PREFIX + datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")


def _write(path: Path, write: Callable) -> None:
    with open(path, "wb") as out:
        write(out)
        out.flush()
        os.fsync(out.fileno())  # on disk before the rename makes the folder visible


def save(run_dir, state: dict, history: list) -> Path:
    """Write ``state`` and the manifest under a temporary name, then rename the folder.

    ``state``'s TENSOR_KEYS go to state.pt; every other key (epoch, arch, classes, config, ...)
    must be JSON and goes to the manifest.
    """
    if is_uri(run_dir):  # an object store has no rename: write here, copy with the manifest last
        with tempfile.TemporaryDirectory() as local:
            folder = save(local, state, history)
            upload(folder, location(run_dir) / folder.name, skip=(MANIFEST,))
            return location(run_dir) / folder.name
    run_dir = Path(run_dir)
    final = run_dir / new_name()
    tmp = run_dir / (TMP + final.name)
    tensors = {k: v for k, v in state.items() if k in TENSOR_KEYS}
    meta = {k: v for k, v in state.items() if k not in TENSOR_KEYS}
    try:
        tmp.mkdir(parents=True)
        _write(tmp / STATE_FILE, lambda out: torch.save(tensors, out))
        manifest = {**meta, "state_bytes": (tmp / STATE_FILE).stat().st_size, "history": history,
                    "written": time.time()}
        _write(tmp / MANIFEST, lambda out: out.write(json.dumps(manifest).encode()))
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        if _disk_full_in(exc):  # no retry frees the disk: one line, every rank stops
            raise DiskFullError(_disk_full(run_dir, final.name)) from None
        raise
    os.rename(tmp, final)
    return final


def _disk_full_in(exc: BaseException) -> bool:
    """ENOSPC in ``exc`` or what it was raised while handling: torch.save's zip writer answers
    the OSError with a RuntimeError of its own ("unexpected pos") as it closes the file."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _disk_full(run_dir: Path, name: str) -> str:
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**20:,.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return (f"no space left on the disk of {run_dir} while writing checkpoint {name} ({free}): free "
            "space there (old runs, a lower run.keep_checkpoints) or set run.storage to a bigger "
            "disk, then rerun the same command to resume")


def read_manifest(folder) -> dict:
    """The manifest of a complete checkpoint; BadCheckpoint says what is wrong otherwise."""
    folder = location(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        size = (folder / STATE_FILE).stat().st_size
    except FileNotFoundError as exc:
        raise BadCheckpoint(f"{PurePosixPath(str(exc.filename)).name} is missing") from None
    except (OSError, ValueError) as exc:
        raise BadCheckpoint(f"{MANIFEST} is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or size != manifest.get("state_bytes"):
        expected = manifest.get("state_bytes") if isinstance(manifest, dict) else "?"
        raise BadCheckpoint(f"{STATE_FILE} has {size} bytes but {expected} were written (truncated)")
    return manifest


def load(folder, map_location="cpu") -> tuple[dict, dict]:
    """(state, manifest) of a checkpoint that passes the checks and loads.

    ``state`` is state.pt's tensors plus the manifest's other fields (epoch, arch, classes, ...).
    """
    manifest = read_manifest(folder)
    try:
        state_file = location(folder) / STATE_FILE
        source = open_bytes(state_file) if is_uri(folder) else state_file
        tensors = torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only met an object: refused, not unpickled
        raise BadCheckpoint(f"{STATE_FILE} holds a pickled object that is not a tensor or plain "
                            f"value ({_refusal(exc)}); refused, it was not loaded") from None
    except Exception as exc:  # a torn zip: any error means this one is unusable
        raise BadCheckpoint(f"{STATE_FILE} does not load ({type(exc).__name__}: "
                            f"{_refusal(exc)})") from None
    if not isinstance(tensors, dict):
        raise BadCheckpoint(f"{STATE_FILE} holds a {type(tensors).__name__}, not a dict of tensors")
    meta = {k: v for k, v in manifest.items() if k not in ("state_bytes", "history", "written")}
    return {**meta, **tensors}, manifest


def _refusal(exc: Exception) -> str:
    """torch's refusal is a page of advice; its "GLOBAL <name>" says what was refused."""
    found = re.search(r"GLOBAL [\w.]+", str(exc))
    if found:
        return f"{found.group(0)} is not allowed"
    return first_line(exc)[:200]


def folders(run_dir) -> list[Path]:
    """The run's checkpoint folders, newest first (their names carry the time)."""
    found = [p for p in location(run_dir).glob(PREFIX + "*") if p.is_dir()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def latest(run_dir, with_state: bool = False, map_location="cpu"):
    """(folder, manifest, state or None) of the newest usable checkpoint, or None.

    Each newer checkpoint that fails its checks is skipped with a warning naming it and the one
    used instead. ``with_state`` loads state.pt too (workers); the driver checks sizes only.
    """
    bad = []
    for folder in folders(run_dir):
        try:
            if with_state:
                state, manifest = load(folder, map_location)
            else:
                state, manifest = None, read_manifest(folder)
        except BadCheckpoint as exc:
            bad.append((folder, exc))
            continue
        for skipped, why in bad:
            log.warning(f"checkpoint {skipped} is unusable: {why}; using the previous one, "
                        f"{folder.name} (epoch {manifest['epoch']})")
        return folder, manifest, state
    for skipped, why in bad:
        log.warning(f"checkpoint {skipped} is unusable: {why}; no older checkpoint is left, so "
                    "training starts at epoch 1")
    return None


def clean_partial(run_dir) -> None:
    """Remove the folders of writers killed mid-write (call before an attempt's rank 0 writes).

    Remote storage has none: a folder there is copied whole (manifest last) or fails its checks.
    """
    if is_uri(run_dir):
        return
    for folder in Path(run_dir).glob(TMP + PREFIX + "*"):
        shutil.rmtree(folder, ignore_errors=True)
