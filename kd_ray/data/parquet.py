"""Image folders packed into Parquet files: root/<split>.parquet with image bytes, label, path.

Class names live in the Arrow schema metadata so a split file is self-describing.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from kd_ray.errors import DataError
from kd_ray.log import get

log = get(__name__)

CLASSES_KEY = b"kd_ray.classes"
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("path", pa.string())])
BATCH_ROWS = 512  # rows per write batch: bounds memory when packing large folders


def split_path(root, split: str) -> Path:
    path = Path(root) / f"{split}.parquet"
    if not path.is_file():
        raise DataError(
            f"{path} not found: set data.root to a folder with {split}.parquet "
            "(make one with `kd-ray convert SRC DST`)"
        )
    return path


def read_classes(path: Path) -> list[str]:
    meta = pq.read_schema(path).metadata or {}
    if CLASSES_KEY not in meta:
        raise DataError(f"{path} has no {CLASSES_KEY.decode()} schema metadata: rewrite it with `kd-ray convert`")
    return json.loads(meta[CLASSES_KEY])


def read_labels(path: Path) -> list[int]:
    """Only the label column: cheap even for large files."""
    return pq.read_table(path, columns=["label"]).column("label").to_pylist()


class ParquetImages(Dataset):
    """Whole split in memory as encoded bytes; items are (PIL RGB image, label)."""

    def __init__(self, path: Path):
        table = pq.read_table(path, columns=["image", "label", "path"])
        self.name = Path(path).name
        self.images = table.column("image").to_pylist()
        self.targets = table.column("label").to_pylist()
        self.paths = table.column("path").to_pylist()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        try:
            with Image.open(io.BytesIO(self.images[i])) as img:
                image = img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DataError(
                f"cannot read image {self.name} row {i} ({self.paths[i]}): {exc}; "
                "delete or replace the file and convert again"
            ) from None
        return image, self.targets[i]


def convert_imagefolder_to_parquet(src_root, dst_root, splits=("train", "val")) -> dict:
    """Pack src_root/<split>/<class>/* into dst_root/<split>.parquet, copying bytes as they are."""
    src_root, dst_root = Path(src_root), Path(dst_root)
    for split in splits:  # check all before writing anything
        if not (src_root / split).is_dir():
            raise DataError(f"source split folder {src_root / split} not found: pass a folder with {'/, '.join(splits)}/ class folders")
    dst_root.mkdir(parents=True, exist_ok=True)
    rows = {}
    for split in splits:
        folder = ImageFolder(src_root / split, allow_empty=True)
        _report_skipped(src_root / split, {p for p, _ in folder.samples})
        meta = {CLASSES_KEY: json.dumps(folder.classes).encode()}
        schema = SCHEMA.with_metadata(meta)
        out = dst_root / f"{split}.parquet"
        try:
            with pq.ParquetWriter(out, schema) as writer:
                for start in range(0, len(folder.samples), BATCH_ROWS):
                    batch = folder.samples[start:start + BATCH_ROWS]
                    writer.write_table(pa.table({
                        "image": [_checked_bytes(p) for p, _ in batch],
                        "label": [label for _, label in batch],
                        "path": [Path(p).relative_to(src_root / split).as_posix() for p, _ in batch],
                    }, schema=schema))
        except DataError:
            out.unlink(missing_ok=True)  # no half-written split
            raise
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
