"""Epoch checkpoints: written atomically, checked on load, older ones used when the newest is bad.

A checkpoint is a folder ``<run>/checkpoint_<time>/`` with ``state.pt`` (model, optimizer,
schedule, epoch, classes, config) and ``manifest.json`` (epoch, arch, classes, the byte size of
state.pt and every epoch's metrics so far). Rank 0 writes both into ``.tmp_checkpoint_<time>/``
and renames the folder when they are complete: a writer killed half-way leaves no folder under a
checkpoint name, and a file cut short later (full disk, a bad copy) fails the size check.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

from kd_ray.log import get

log = get(__name__)

STATE_FILE = "state.pt"
MANIFEST = "manifest.json"
PREFIX = "checkpoint_"
TMP = ".tmp_"


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
    """Write ``state`` and the manifest under a temporary name, then rename the folder."""
    run_dir = Path(run_dir)
    final = run_dir / new_name()
    tmp = run_dir / (TMP + final.name)
    tmp.mkdir(parents=True)
    _write(tmp / STATE_FILE, lambda out: torch.save(state, out))
    manifest = {"epoch": state["epoch"], "stage": state.get("stage"), "arch": state.get("arch"),
                "classes": state.get("classes"), "state_bytes": (tmp / STATE_FILE).stat().st_size,
                "history": history, "written": time.time()}
    _write(tmp / MANIFEST, lambda out: out.write(json.dumps(manifest).encode()))
    os.rename(tmp, final)
    return final


def read_manifest(folder) -> dict:
    """The manifest of a complete checkpoint; BadCheckpoint says what is wrong otherwise."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        size = (folder / STATE_FILE).stat().st_size
    except FileNotFoundError as exc:
        raise BadCheckpoint(f"{Path(exc.filename).name} is missing") from None
    except (OSError, ValueError) as exc:
        raise BadCheckpoint(f"{MANIFEST} is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or size != manifest.get("state_bytes"):
        expected = manifest.get("state_bytes") if isinstance(manifest, dict) else "?"
        raise BadCheckpoint(f"{STATE_FILE} has {size} bytes but {expected} were written (truncated)")
    return manifest


def load(folder, map_location="cpu") -> tuple[dict, dict]:
    """(state, manifest) of a checkpoint that passes the checks and loads."""
    manifest = read_manifest(folder)
    try:
        state = torch.load(Path(folder) / STATE_FILE, map_location=map_location, weights_only=False)
    except Exception as exc:  # a torn zip, a pickle error: any of them means this one is unusable
        raise BadCheckpoint(f"{STATE_FILE} does not load ({type(exc).__name__}: {exc})") from None
    return state, manifest


def folders(run_dir) -> list[Path]:
    """The run's checkpoint folders, newest first (their names carry the time)."""
    found = [p for p in Path(run_dir).glob(PREFIX + "*") if p.is_dir()]
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
    """Remove the folders of writers killed mid-write (call before an attempt's rank 0 writes)."""
    for folder in Path(run_dir).glob(TMP + PREFIX + "*"):
        shutil.rmtree(folder, ignore_errors=True)
