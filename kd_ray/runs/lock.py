"""One owner per run folder and per sweep folder: a lock file that names its owner.

``<folder>/.kd_ray.lock`` is created with O_CREAT|O_EXCL (atomic on local disks and on NFS v3+,
where fcntl/flock locks are unreliable) and holds the owner's host, PID and start time. A thread
touches it every ``HEARTBEAT_S`` seconds while the run lives. A second driver is refused with one
line naming the owner; a lock whose owner is gone (a dead PID on this host, or no heartbeat for
``STALE_S`` seconds from another host) is taken over with a warning. No torch, no Ray: the CLI
takes the lock before either is imported.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from kd_ray.errors import ConfigError, InUseError
from kd_ray.log import get
from kd_ray.storage import is_uri, location

log = get(__name__)
LOCK_FILE = ".kd_ray.lock"
HEARTBEAT_S = 10.0
STALE_S = 120.0  # another host's lock without a heartbeat this long is taken over
_held: dict[Path, "RunLock"] = {}  # folders this process holds (taking one again is a no-op)


def _pid_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), so that a reused PID is not taken for the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    pid = int(owner.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    start = owner.get("pid_start")
    return start is None or _pid_start(pid) in (None, start)


def read_owner(folder) -> dict | None:
    """The lock's owner record plus ``age_s`` (seconds since its last heartbeat), or None."""
    path = Path(folder) / LOCK_FILE
    try:
        owner = json.loads(path.read_text() or "{}")
        owner["age_s"] = time.time() - path.stat().st_mtime
        return owner
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"host": "?", "pid": 0, "age_s": 0.0}  # being written right now: treat as live


def stale_reason(owner: dict) -> str | None:
    """Why the owner is gone (its lock may be taken over), or None while it lives."""
    if owner.get("host") == socket.gethostname():
        return None if _alive(owner) else f"process {owner.get('pid')} on this host has ended"
    if owner["age_s"] > STALE_S:
        return f"no heartbeat for {owner['age_s']:.0f} s"
    return None


def describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return (f"kd-ray PID {owner.get('pid')} on {owner.get('host')} (started {started}, "
            f"last heartbeat {owner['age_s']:.0f} s ago)")


def _make_folder(folder: Path, setting: str) -> list:
    """Create the folder (and its parents); the folders created here, deepest first (removed again
    if the run is refused before it writes anything). Bad paths: ConfigError."""
    if folder.is_dir():
        return []
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    blocker = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"{setting} {folder}: {blocker} is a file, not a folder: pick another "
                          f"{setting} or move that file")
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot create {folder} ({exc.strerror or exc}): pick another {setting}") from None
    return missing


def fresh_name(storage, name: str) -> str:
    """``name`` if no run has it yet, else the first free ``name-2``, ``name-3``, ..."""
    storage = location(storage)
    if not (storage / name).exists():
        return name
    n = 2
    while (storage / f"{name}-{n}").exists():
        n += 1
    log.info(f"{storage / name} exists; --new starts {name}-{n} beside it")
    return f"{name}-{n}"


class RunLock:
    """Held from ``acquire`` to ``release`` (a context manager); re-entrant within one process."""

    def __init__(self, folder, what: str = "run", fix: str = "wait for it to finish, or start a "
                 "fresh run beside it with --new", setting: str = "run.storage"):
        # Object storage has no exclusive create here: no lock there (yet), see docs/failures.md.
        self.remote = is_uri(folder)
        self.folder = Path("/") if self.remote else Path(folder).expanduser().resolve()
        self.path = self.folder / LOCK_FILE
        self.what, self.fix, self.setting = what, fix, setting
        self.created = []
        self.token = None
        self._stop = threading.Event()
        self._outer = None  # the lock this process already held for the folder

    def acquire(self) -> "RunLock":
        if self.remote:
            return self
        if self.folder in _held:
            self._outer = _held[self.folder]
            return self
        self.created = _make_folder(self.folder, self.setting)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
              "started": time.time(), "token": os.urandom(8).hex()}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            except PermissionError:
                raise ConfigError(f"{self.folder} is not writable: pick a folder you can write "
                                  f"({self.setting})") from None
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(me))
            self.token = me["token"]
            _held[self.folder] = self
            threading.Thread(target=self._beat, daemon=True, name="kd_ray-lock").start()
            return self
        raise InUseError(f"{self.folder} is being taken by another kd-ray at this moment: retry")

    def _take_over_or_refuse(self) -> None:
        owner = read_owner(self.folder)
        if owner is None:
            return  # released meanwhile: try again
        why = stale_reason(owner)
        if why is None:
            raise InUseError(f"{self.what} {self.folder} is in use by {describe(owner)}: {self.fix}")
        # Rename first: of two drivers taking over at once, one rename wins, the other retries.
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
            aside.unlink()
        except FileNotFoundError:
            return
        log.warning(f"{self.what} {self.folder} was locked by {describe(owner)}, which is gone "
                    f"({why}); taking it over")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the folder went away; nothing to refresh

    def release(self) -> None:
        if self._outer is not None or self.token is None:
            return
        self._stop.set()
        _held.pop(self.folder, None)
        owner = read_owner(self.folder)
        if owner is not None and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        for folder in self.created:  # refused before anything was written: no empty folders left
            try:
                folder.rmdir()
            except OSError:
                break
        self.token = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
