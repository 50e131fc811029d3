"""Progress on the driver: each new line of metrics.jsonl printed while training runs elsewhere."""
from __future__ import annotations

import json
import threading
from pathlib import Path

from kd_ray.log import get
from kd_ray.storage import location

log = get(__name__)


class ProgressPrinter:
    """Prints each new line of metrics.jsonl on the driver while ``fit()`` blocks."""

    def __init__(self, run_dir, label: str, interval: float = 0.5):
        self.path = location(run_dir) / "metrics.jsonl"  # a local file or an object in storage
        self.label = label
        self.interval = interval if isinstance(self.path, Path) else max(interval, 2.0)
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
        data = self.path.read_bytes()[self._offset:]
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        complete = complete.decode()
        for line in complete.splitlines():
            if line.strip():
                log.info(progress_line(self.label, json.loads(line)))


def progress_line(label: str, row: dict) -> str:
    parts = [f"{label} epoch {row.get('epoch')}/{row.get('epochs')}",
             f"train loss {row.get('train/loss', float('nan')):.4f}",
             f"val loss {row.get('val/loss', float('nan')):.4f}",
             f"top1 {100 * row.get('val/top1', float('nan')):.2f}%"]
    if "val/top5" in row:
        parts.append(f"top5 {100 * row['val/top5']:.2f}%")
    parts.append(f"{row.get('perf/images_per_s', 0):.0f} img/s")
    parts.append(f"{row.get('perf/epoch_seconds', 0):.1f}s")
    return " | ".join(parts)
