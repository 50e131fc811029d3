"""Image files -> model inputs with NumPy and PIL only, so that an exported ONNX file classifies
images without torch or kd_ray's models code.

The preprocessing repeats the validation transform of the dataset the model was trained on
(``data.datasets.make_transform``): PIL datasets (imagefolder, parquet) resize the shorter side
and crop the centre, then use ImageNet's mean and std; tensor datasets (mnist5k, digits,
synthetic) resize to a square and map [0, 1] to [-1, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kd_ray.errors import first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
IMAGENET = {"resize": "shorter_side_center_crop", "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225]}
HALF = {"resize": "square", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def preprocess_spec(pil: bool, image_size: int) -> dict:
    """How an image file becomes an input: travels with an exported model."""
    return {**(IMAGENET if pil else HALF), "image_size": int(image_size), "layout": "NCHW RGB float32"}


def list_images(paths) -> list[Path]:
    """Files as given, folders searched recursively for image files (sorted)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*")
                                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(path)
    return found


def load_image(path, spec: dict) -> np.ndarray:
    """One image file as a float32 [3, size, size] array; OSError/ValueError when undecodable."""
    from PIL import Image  # local: only commands that read image files need PIL

    size = spec["image_size"]
    with Image.open(path) as img:
        img = img.convert("RGB")
    if spec["resize"] == "shorter_side_center_crop":
        w, h = img.size  # as torchvision's Resize(int) + CenterCrop on a PIL image
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        new = (size, new_long) if w <= h else (new_long, size)
        if new != (w, h):
            img = img.resize(new, Image.BILINEAR)
        w, h = img.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    elif img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(spec["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(spec["std"], dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def load_images(paths, spec: dict):
    """(arrays, kept paths, [(path, reason)] of files that could not be decoded)."""
    from PIL import Image  # local: only commands that read image files need PIL

    arrays, kept, bad = [], [], []
    for path in paths:  # PIL raises all four on bad files (a decompression bomb is no OSError)
        try:
            arrays.append(load_image(path, spec))
            kept.append(Path(path))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL's bad-file errors
            bad.append((Path(path), first_line(exc)))
    return arrays, kept, bad
