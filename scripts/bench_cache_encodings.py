"""Teacher-cache encodings at 1,000 classes: bytes per row, read speed, and how far each moves
every logit method's loss (largest relative error against float32 logits, at T 1, 2, 4, 8).

    python scripts/bench_cache_encodings.py [--rows 20000]

Prints a markdown table. Read speed: rows/s of ``CachedLogits.row`` over every row of a written
cache in a shuffled order, one process, after one warm-up pass (the files in the page cache: what
an epoch reads after the first). Loss error: ``kd_ray.cache.fidelity`` (a confident teacher,
8 * randn logits with the label's class 4 above the rest; two students; labels -1).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from kd_ray.cache.fidelity import TOLERANCE, encoding_error
from kd_ray.cache.rows import CachedLogits, ShardWriter
from kd_ray.config import DistillConfig

CLASSES = 1000
TEMPS = (1.0, 2.0, 4.0, 8.0)
ENCODINGS = (("float16", None), ("int8", None), ("topk", 32))
METHODS = (("kd", {}), ("kd standardize", {"standardize": True}), ("mse_logits", {}), ("dkd", {}),
           ("dist", {}))


def read_speed(encoding: str, top_k, rows: int, folder: Path) -> tuple[int, float]:
    logits = (8 * np.random.default_rng(0).standard_normal((rows, CLASSES))).astype(np.float32)
    writer = ShardWriter(folder, 0, rows, CLASSES, top_k, encoding)
    for start in range(0, rows, 4096):
        writer.add(logits[start:start + 4096])
    writer.close()
    cache = CachedLogits(folder, rows, 1, CLASSES, [0, rows])
    order = np.random.default_rng(1).permutation(rows)
    for i in order:  # warm-up: the page cache holds the files, as from an epoch's second pass
        cache.row(int(i), 0)
    started = time.perf_counter()
    for i in order:
        cache.row(int(i), 0)
    return cache.nbytes_per_row(), rows / (time.perf_counter() - started)


def label(encoding: str, k) -> str:
    return f"top-{k}" if k else encoding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    args = parser.parse_args()
    print(f"Teacher-cache encodings at {CLASSES} classes. Read: {args.rows} rows, shuffled, one "
          "process, files in the page cache.\n")
    print("| encoding | bytes/row | read rows/s |\n|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for encoding, k in ENCODINGS:
            folder = Path(tmp) / encoding
            folder.mkdir()
            nbytes, speed = read_speed(encoding, k, args.rows, folder)
            print(f"| {label(encoding, k)} | {nbytes:,} | {speed:,.0f} |")
    print(f"\nLargest relative loss error against float32 logits (confident teacher, {CLASSES} "
          f"classes); **x**: over the {TOLERANCE:.0%} tolerance, refused before the run.\n")
    print("| method | T | " + " | ".join(label(e, k) for e, k in ENCODINGS) + " |")
    print("|---|---:" + "|---:" * len(ENCODINGS) + "|")
    for name, params in METHODS:
        for temp in TEMPS:
            cfg = DistillConfig(loss=name.split()[0], temperature=temp, params=params)
            cells = []
            for encoding, k in ENCODINGS:
                err = encoding_error(cfg, encoding, k, CLASSES)
                cells.append(f"{err:.3%}" + (" **x**" if err > TOLERANCE else ""))
            print(f"| {name} | {temp:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
