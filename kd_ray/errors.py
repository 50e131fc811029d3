"""Errors a user can fix, and the one place that finds them inside Ray's wrappers.

The CLI prints a KdRayError as one line and exits 2; RunFailedError (retries used up) and
RayStartError exit 1; RunInterrupted (Ctrl-C) exits 130, 143 when SIGTERM stopped it.
Nothing here imports Ray: Ray's wrappers are walked through ``cause`` / ``__cause__``.
"""
from __future__ import annotations

import re


class KdRayError(Exception):
    """Base class: the message names what is wrong and how to fix it."""


class ConfigError(KdRayError):
    """Bad config value, unknown key or unknown registry name."""


class DataError(KdRayError):
    """Missing data root or split, empty class folder, corrupt image, class mismatch."""


class CacheError(DataError):
    """A teacher cache whose row files were cut short or changed after it was built."""


class TeacherError(KdRayError):
    """Teacher file missing, unreadable or not matching the dataset."""


class ModelFileError(KdRayError):
    """A run folder without a usable checkpoint, a model file of another format, an export that
    does not match PyTorch (export, eval, predict, bench)."""


class DiskFullError(KdRayError):
    """No space left where a checkpoint is written; the partial checkpoint folder is removed."""


class NonFiniteLossError(KdRayError):
    """Loss became NaN or inf; raised with the epoch and step."""


class CollapseError(KdRayError):
    """The student collapsed (one class predicted for nearly everything) or its loss diverged."""


class PeerFailedError(KdRayError):
    """Another rank hit one of the errors above; this rank stops at the same step."""


class InUseError(KdRayError):
    """Another kd-ray driver owns this run or sweep folder (runs.lock)."""


class RunsFailedError(KdRayError):
    """Some runs of a pipeline or comparison failed; the others finished and the tables were
    written (``table``, in ``root``)."""

    def __init__(self, message: str, root=None, table: str = ""):
        super().__init__(message)
        self.root, self.table = root, table


class RunInterrupted(Exception):
    """Ctrl-C: the run stopped (after its current epoch's checkpoint, or at once); rerun resumes."""


class RayStartError(RuntimeError):
    """The local Ray instance did not start (a loaded machine); nothing was trained."""


class RunFailedError(RuntimeError):
    """Training failed after Ray's retries (run.max_failures); finished epochs are kept."""


# The errors that may cross a process boundary as a worker's return value (see ``to_payload``).
CROSSING = {cls.__name__: cls for cls in
            (KdRayError, ConfigError, DataError, CacheError, TeacherError, DiskFullError,
              NonFiniteLossError, CollapseError, PeerFailedError)}


def first_line(error: BaseException | str) -> str:
    """The first non-blank line of an error's text (or of a message), stripped: torch, YAML and
    PIL put the message first and pages of advice after it. An error with no text gives its type
    name; an empty message gives "". Errors wrapped in a traceback's text want ``one_line``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines:
        return lines[0]
    return "" if isinstance(error, str) else type(error).__name__


def one_line(error: BaseException) -> str:
    """The message itself, also when a DataLoader worker wrapped it in its traceback text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else repr(error)
    prefix = f"{type(error).__module__}.{type(error).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def innermost(error: BaseException) -> BaseException:
    """The error at the bottom of a chain of wrappers (Ray's ``cause``, Python's ``__cause__``)."""
    while (getattr(error, "cause", None) or error.__cause__) is not None:
        error = getattr(error, "cause", None) or error.__cause__
    return error


def user_error_in(error: BaseException | None) -> KdRayError | None:
    """Our own error inside Ray's wrappers (causes, RayTaskError(...) subclasses), if any: the
    innermost one, whose message is the plain line rather than a wrapper's traceback text."""
    found = None
    while error is not None:
        if isinstance(error, KdRayError):
            found = error
        error = error.__cause__ or getattr(error, "cause", None)
    return found


def user_error_of_workers(worker_failures: dict) -> KdRayError | None:
    """The first rank's KdRayError in ``{rank: error}`` (Ray's worker failures), as one line."""
    for rank, failure in sorted(worker_failures.items()):
        found = user_error_in(failure)
        if found is not None:
            return type(found)(f"{one_line(found)} (rank {rank})")
    return None


def describe(error: BaseException) -> str:
    """``Type: last line`` of the innermost error inside Ray's wrappers (for failures.jsonl)."""
    error = innermost(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    name = type(error).__name__.replace("RayTaskError(", "").rstrip(")")
    last = re.sub(r"^\[[^\]]*\]\s*", "", lines[-1] if lines else "")  # gloo's "[/path/file.cc:545] "
    if len(last) > 300:  # Ray's actor-death messages run to a paragraph
        last = last[:297] + "..."
    return last if last.startswith(name) else f"{name}: {last}"


def to_payload(error: KdRayError) -> dict:
    """A KdRayError as plain data, to return from a worker (a return value uses no Ray retry)."""
    return {"error": type(error).__name__, "message": one_line(error)}


def from_payload(value) -> KdRayError | None:
    """The error ``to_payload`` encoded, or None when ``value`` holds none."""
    if not (isinstance(value, dict) and value.get("error")):
        return None
    return CROSSING.get(value["error"], KdRayError)(value["message"])
