"""Image tables in Parquet: a split is one file or a folder of shards, read by row group.

Layouts read (``name: parquet``): ``root/<split>.parquet`` (one file, or a folder of shards as Spark
writes), or ``root/<split>/`` holding ``*.parquet`` shards (what ``ray.data``'s ``write_parquet`` and
``kd-ray convert`` write). Columns: ``image`` (encoded bytes), ``label`` (int), optional ``path``.
Class names live in the schema metadata (``kd_ray.classes``); a table without them (e.g. written
by Ray Data) gets the names "0".."C-1" from its labels.

``ParquetImages`` never holds a split in memory: an item reads its row group (a few MiB) into a
small LRU; ``data.sampling`` orders each epoch by row group so that every group is read once.
"""
from __future__ import annotations

import io
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from torch.utils.data import Dataset

from kd_ray.errors import DataError
from kd_ray.log import get

log = get(__name__)

CLASSES_KEY = b"kd_ray.classes"
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("path", pa.string())])
GROUP_ROWS = 1024  # rows per row group written by convert, at most...
GROUP_BYTES = 16 * 2**20  # ...and about this many bytes: what one cached row group costs a reader
SHARD_BYTES = 512 * 2**20  # about this many bytes per shard file
CACHED_GROUPS = 4  # row groups a reader keeps (see data.sampling.WINDOW)


def _hidden(path: Path, top: Path) -> bool:
    return any(part.startswith(("_", ".")) for part in path.relative_to(top).parts)


def split_files(root, split: str) -> list[Path]:
    """The split's Parquet files in a fixed order (sorted names; ``_``/``.`` files skipped)."""
    root = Path(root)
    for top in (root / f"{split}.parquet", root / split):
        if top.is_file():
            return [top]
        if top.is_dir():
            files = sorted(p for p in top.rglob("*.parquet") if p.is_file() and not _hidden(p, top))
            if files:
                return files
    raise DataError(
        f"{root / split}.parquet not found (nor a folder {root / split}/ of .parquet shards): set "
        f"data.root to a folder with {split}.parquet or {split}/ (make one with `kd-ray convert SRC DST`)"
    )


def read_labels(files) -> np.ndarray:
    """Only the label column, as int64 (8 bytes a row, however large the images), filled a batch
    at a time so that the peak is the result plus one batch."""
    readers = [pq.ParquetFile(f) for f in files]
    out, at = np.empty(sum(r.metadata.num_rows for r in readers), dtype=np.int64), 0
    for reader in readers:
        for batch in reader.iter_batches(batch_size=1 << 16, columns=["label"]):
            out[at:at + len(batch)] = batch.column(0).to_numpy()
            at += len(batch)
    return out


def read_classes(files) -> list[str] | None:
    """The class names in the schema metadata, or None when the table has none."""
    for f in files:
        meta = pq.read_schema(f).metadata or {}
        if CLASSES_KEY in meta:
            return json.loads(meta[CLASSES_KEY])
    return None


class ParquetImages(Dataset):
    """Items (PIL RGB image, label) read by row group; at most ``cached_groups`` groups in memory."""

    def __init__(self, files, cached_groups: int = CACHED_GROUPS, labels: np.ndarray | None = None):
        self.files = [str(f) for f in files]
        counts, self.where = [], []
        for i, f in enumerate(self.files):
            meta = pq.ParquetFile(f).metadata
            for g in range(meta.num_row_groups):
                counts.append(meta.row_group(g).num_rows)
                self.where.append((i, g))
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.targets = read_labels(self.files) if labels is None else labels
        self.cached_groups = max(1, cached_groups)
        self.held: OrderedDict = OrderedDict()  # row group -> (image column, path column)
        self.reads = self.most_held = 0  # row groups read, and the most held at once (tests)

    def __len__(self):
        return int(self.starts[-1])

    def row_groups(self) -> np.ndarray:
        """The row group of every row (for the sampler)."""
        return np.repeat(np.arange(len(self.where), dtype=np.int32), np.diff(self.starts))

    def __getstate__(self):  # loader workers start with an empty LRU
        return {**self.__dict__, "held": OrderedDict()}

    def _group(self, g: int):
        if g in self.held:
            self.held.move_to_end(g)
            return self.held[g]
        file, index = self.where[g]
        reader = pq.ParquetFile(self.files[file])
        names = reader.schema_arrow.names
        table = reader.read_row_group(index, columns=["image"] + (["path"] if "path" in names else []))
        entry = (table.column("image").combine_chunks(),
                 table.column("path").combine_chunks() if "path" in names else None)
        self.held[g] = entry
        self.reads += 1
        while len(self.held) > self.cached_groups:
            self.held.popitem(last=False)
        self.most_held = max(self.most_held, len(self.held))
        return entry

    def __getitem__(self, i):
        i = int(i)
        g = int(np.searchsorted(self.starts, i, side="right")) - 1
        images, paths = self._group(g)
        row = i - int(self.starts[g])
        try:
            with Image.open(io.BytesIO(images[row].as_py())) as img:
                image = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # a bomb is no OSError
            name = paths[row].as_py() if paths is not None else f"row {row} of row group {self.where[g][1]}"
            raise DataError(
                f"cannot read image {Path(self.files[self.where[g][0]]).name} row {i} ({name}): {exc}; "
                "delete or replace the file and convert again"
            ) from None
        return image, int(self.targets[i])


class TableWriter:
    """Rows into part-NNNNN.parquet files of about SHARD_BYTES, row groups of bounded size."""

    def __init__(self, folder: Path, schema: pa.Schema, shard_bytes: int):
        self.folder, self.schema, self.shard_bytes = folder, schema, shard_bytes
        self.writer, self.shards, self.written = None, 0, 0
        self.rows: list = []
        self.pending = 0

    def add(self, image: bytes, label: int, path: str) -> None:
        self.rows.append((image, label, path))
        self.pending += len(image)
        if len(self.rows) >= GROUP_ROWS or self.pending >= GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        if self.writer is None or self.written >= self.shard_bytes:
            self.close()
            self.writer = pq.ParquetWriter(self.folder / f"part-{self.shards:05d}.parquet", self.schema)
            self.shards, self.written = self.shards + 1, 0
        images, labels, paths = zip(*self.rows)
        self.writer.write_table(pa.table({"image": images, "label": labels, "path": paths},
                                         schema=self.schema), row_group_size=len(self.rows))
        self.written += self.pending
        self.rows, self.pending = [], 0

    def finish(self) -> None:
        self.flush()
        if self.shards == 0:  # an empty split still gets a file with its schema
            self.writer = pq.ParquetWriter(self.folder / "part-00000.parquet", self.schema)
            self.shards = 1
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def convert_imagefolder_to_parquet(src_root, dst_root, splits=("train", "val"),
                                   shard_mb: float = SHARD_BYTES / 2**20) -> dict:
    """Pack src_root/<split>/<class>/* into dst_root/<split>/part-NNNNN.parquet shards, copying
    the encoded bytes as they are; each shard about ``shard_mb`` MiB."""
    src_root, dst_root = Path(src_root), Path(dst_root)
    for split in splits:  # check all before writing anything
        if not (src_root / split).is_dir():
            raise DataError(f"source split folder {src_root / split} not found: pass a folder with {'/, '.join(splits)}/ class folders")
        out = dst_root / split
        if out.exists() and (not out.is_dir() or any(not f.name.startswith("part-") for f in out.iterdir())):
            raise DataError(f"{out} exists and holds other files than part-*.parquet: "
                            "pass an empty DST folder")
    from torchvision.datasets import ImageFolder  # here: ~2 CPU s to import, for `convert` alone

    rows = {}
    for split in splits:
        folder = ImageFolder(src_root / split, allow_empty=True)
        out, staging = dst_root / split, dst_root / f".{split}.converting"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        schema = SCHEMA.with_metadata({CLASSES_KEY: json.dumps(folder.classes).encode()})
        _report_skipped(src_root / split, {p for p, _ in folder.samples})
        writer = TableWriter(staging, schema, int(shard_mb * 2**20))
        try:
            for p, label in folder.samples:
                writer.add(_checked_bytes(p), label, Path(p).relative_to(src_root / split).as_posix())
            writer.finish()
        except DataError:
            shutil.rmtree(staging, ignore_errors=True)  # no half-written split
            raise
        shutil.rmtree(out, ignore_errors=True)  # a previous conversion (checked above: ours)
        staging.rename(out)
        rows[split] = len(folder.samples)
    return rows


def _checked_bytes(path) -> bytes:
    """The file's bytes, once PIL has checked them (a corrupt image would stop training later)."""
    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as exc:  # PIL raises many types for broken files
        why = "not an image PIL can identify" if "BytesIO" in str(exc) else str(exc)
        raise DataError(f"cannot read image {path}: {why}; delete or replace the file and convert "
                        "again") from None
    return data


def _report_skipped(split_root: Path, packed: set) -> None:
    """Name the files in class folders that are not images (ImageFolder skips them)."""
    skipped = sorted(p for p in split_root.glob("*/*") if p.is_file() and str(p) not in packed)
    if skipped:
        names = ", ".join(str(p.relative_to(split_root)) for p in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.warning(f"{split_root.name}: skipped {len(skipped)} file(s) that are not images by their "
                    f"extension: {names}{more}")
