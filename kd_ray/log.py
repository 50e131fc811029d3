"""The ``kd_ray`` logger: every module logs through it; the CLI and each Ray worker format it once.

Lines go to the current ``sys.stdout`` as ``[kd_ray] message`` (warnings: ``[kd_ray] warning: ...``);
errors go to ``sys.stderr`` as ``kd-ray: <message>`` (log them as "error: ..." or "hint: ...").
"""
from __future__ import annotations

import logging
import sys

NAME = "kd_ray"


def get(module: str) -> logging.Logger:
    """The logger of a kd_ray module: ``log = get(__name__)``."""
    return logging.getLogger(module if module.startswith(NAME) else f"{NAME}.{module}")


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:  # the CLI's own form: "kd-ray: error: ..."
            return f"kd-ray: {message}"
        if record.levelno >= logging.WARNING:
            return f"[kd_ray] warning: {message}"
        return f"[kd_ray] {message}"


class _Console(logging.Handler):
    """Writes to whatever ``sys.stdout``/``sys.stderr`` are at the time (pytest swaps them);
    errors go to stderr, the rest to stdout."""

    def emit(self, record):
        try:
            stream = sys.stderr if record.levelno >= logging.ERROR else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def configure(level: int | str = logging.INFO) -> logging.Logger:
    """Format the kd_ray logger (idempotent); called by the CLI, each worker and the tests."""
    logger = logging.getLogger(NAME)
    logger.setLevel(level)
    if not any(isinstance(h, _Console) for h in logger.handlers):
        handler = _Console()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
    logger.propagate = False  # Ray's and the root logger's handlers would print it again
    return logger
