"""The cache's row files: fixed-width ``.npy`` arrays written as a stream, read a row at a time.

Shard ``s`` holds the rows of flat ids ``[bounds[s], bounds[s+1])`` (flat id = view * samples +
sample, in order) as ``part-SSSSS.<column>.npy``, by encoding (``distill.cache_encoding``):
``float16`` (the default; exact to float16): ``logits`` float16 [rows, C]; ``int8``: ``q`` int8
[rows, C] with a per-row ``lo`` and ``step`` float32 [rows] (logit = lo + (q + 128) * step);
``topk``: ``top_index`` int32 [rows, k], ``top_logit`` float16 [rows, k] and ``rest`` float32
[rows] (the log of the mass of the other classes). A reader ``pread``s the bytes of one row: nothing is held in
memory between rows, and nothing is memory-mapped (mapped pages would count towards the worker's
resident memory as an epoch touches them, growing it to the cache's size).
"""
from __future__ import annotations

import bisect
import io
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

DENSE = {"logits": np.float16}
INT8 = {"q": np.int8, "lo": np.float32, "step": np.float32}
TOP_K = {"top_index": np.int32, "top_logit": np.float16, "rest": np.float32}
COLUMNS = {"float16": DENSE, "int8": INT8, "topk": TOP_K}


def encoding_of(top_k: int | None, encoding: str | None, num_classes: int) -> str:
    """The encoding name; ``encoding`` None: top-k when a k is given (the older call)."""
    encoding = encoding or ("topk" if top_k else "float16")
    return "float16" if encoding == "topk" and (not top_k or top_k >= num_classes) else encoding


def encode(logits: np.ndarray, top_k: int | None, encoding: str | None = None) -> dict:
    """Columns of a block of float32 logits [rows, C] in ``encoding`` (see the module's doc)."""
    encoding = encoding_of(top_k, encoding, logits.shape[1])
    if encoding == "float16":
        return {"logits": logits.astype(np.float16)}
    if encoding == "int8":
        lo, hi = logits.min(axis=1), logits.max(axis=1)
        step = np.where(hi > lo, (hi - lo) / 255, 1.0).astype(np.float32)
        q = np.rint((logits - lo[:, None]) / step[:, None]) - 128
        return {"q": np.clip(q, -128, 127).astype(np.int8), "lo": lo.astype(np.float32), "step": step}
    index = np.argpartition(-logits, top_k - 1, axis=1)[:, :top_k]
    top = np.take_along_axis(logits, index, axis=1)
    others = logits.copy()
    np.put_along_axis(others, index, -np.inf, axis=1)
    peak = others.max(axis=1, keepdims=True)
    rest = peak[:, 0] + np.log(np.exp(others - peak).sum(axis=1))  # logsumexp of the other classes
    return {"top_index": index.astype(np.int32), "top_logit": top.astype(np.float16),
            "rest": rest.astype(np.float32)}


def decode(columns: dict, num_classes: int) -> np.ndarray:
    """Float32 logits [rows, C] from encoded columns (what the cache serves, float16 aside)."""
    if "logits" in columns:
        return columns["logits"].astype(np.float32)
    if "q" in columns:
        q = columns["q"].astype(np.float32) + 128
        return columns["lo"][:, None] + q * columns["step"][:, None]
    index, top = columns["top_index"], columns["top_logit"]
    # The other classes share the stored mass equally: exact top-k probabilities at T = 1.
    fill = columns["rest"] - math.log(num_classes - index.shape[1])
    full = np.repeat(fill.astype(np.float32)[:, None], num_classes, axis=1)
    np.put_along_axis(full, index.astype(np.int64), top.astype(np.float32), axis=1)
    return full


def roundtrip(logits: np.ndarray, encoding: str, top_k: int | None = None) -> np.ndarray:
    """``logits`` as a cache in ``encoding`` serves them back (float32)."""
    return decode(encode(logits, top_k, encoding), logits.shape[1])


def shard_file(folder, shard: int, column: str) -> Path:
    return Path(folder) / f"part-{shard:05d}.{column}.npy"


class _Sum:
    """A file being written, with its byte count and CRC-32 (recorded in the manifest)."""

    def __init__(self, path: Path):
        self.f, self.bytes, self.crc = open(path, "wb"), 0, 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.bytes += len(data)
        self.crc = zlib.crc32(data, self.crc)


class ShardWriter:
    """Appends encoded blocks to one shard's column files; the row count is fixed up front.

    ``sums`` (after ``close``): each file's name -> {"bytes", "crc32"}, for the manifest."""

    def __init__(self, folder, shard: int, rows: int, num_classes: int, top_k: int | None,
                 encoding: str | None = None):
        self.rows, self.top_k, self.written, self.num_classes = rows, top_k, 0, num_classes
        self.encoding = encoding_of(top_k, encoding, num_classes)
        widths = {"float16": {"logits": num_classes}, "int8": {"q": num_classes, "lo": 0, "step": 0},
                  "topk": {"top_index": top_k, "top_logit": top_k, "rest": 0}}[self.encoding]
        self.files, self.sums = {}, {}
        for column, width in widths.items():
            dtype = np.dtype(COLUMNS[self.encoding][column])
            f = _Sum(shard_file(folder, shard, column))
            shape = (rows, width) if width else (rows,)
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
            f.write(header.getvalue())
            self.files[column] = (f, dtype)

    def add(self, logits: np.ndarray) -> None:
        for column, values in encode(logits, self.top_k, self.encoding).items():
            f, dtype = self.files[column]
            f.write(np.ascontiguousarray(values, dtype=dtype).tobytes())
        self.written += len(logits)

    def close(self) -> None:
        for f, _ in self.files.values():
            f.f.close()
            self.sums[Path(f.f.name).name] = {"bytes": f.bytes, "crc32": f.crc}
        if self.written != self.rows:
            raise RuntimeError(f"cache shard got {self.written} rows, expected {self.rows}")


def file_crc32(path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


class _Column:
    def __init__(self, path: Path):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(f)
            self.offset = f.tell()
        self.path, self.rows, self.dtype = str(path), shape[0], dtype
        self.width, self.ndim = (shape[1] if len(shape) > 1 else 1), len(shape)
        self.row_bytes = self.width * dtype.itemsize
        self.bytes = self.offset + self.rows * self.row_bytes  # what its header says was written
        self.fd = None

    def read(self, row: int) -> np.ndarray:
        if self.fd is None:  # opened in the process that reads (loader workers included)
            self.fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self.fd, self.row_bytes, self.offset + row * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype)

    def __getstate__(self):
        return {**self.__dict__, "fd": None}


class CachedLogits:
    """Teacher logits of (sample, view), read from the shard files one row at a time."""

    def __init__(self, folder, samples: int, views: int, num_classes: int, bounds: list[int]):
        self.samples, self.views, self.num_classes = samples, views, num_classes
        self.bounds = list(bounds)
        names = next((c for c in (DENSE, INT8) if shard_file(folder, 0, next(iter(c))).exists()), TOP_K)
        self.columns = [{name: _Column(shard_file(folder, s, name)) for name in names}
                        for s in range(len(bounds) - 1)]
        self.dense = names is DENSE

    def complete(self) -> bool:
        return all(col.rows == self.bounds[s + 1] - self.bounds[s]
                   for s, shard in enumerate(self.columns) for col in shard.values())

    def files(self) -> list:
        """Every row file's (path, bytes its header promises)."""
        return [(Path(col.path), col.bytes) for shard in self.columns for col in shard.values()]

    def nbytes_per_row(self) -> int:
        """Bytes one (sample, view) row takes on disk (the encodings table reads it)."""
        return sum(col.row_bytes for col in self.columns[0].values())

    def row(self, index: int, view: int) -> torch.Tensor:
        flat = view * self.samples + index
        s = bisect.bisect_right(self.bounds, flat) - 1
        shard, local = self.columns[s], flat - self.bounds[s]
        if self.dense:
            return torch.from_numpy(shard["logits"].read(local).copy())  # float16; the loss upcasts
        columns = {name: col.read(local).reshape((1, -1) if col.ndim == 2 else (1,))
                   for name, col in shard.items()}
        return torch.from_numpy(decode(columns, self.num_classes)[0])
