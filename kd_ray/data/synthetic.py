"""A small learnable PNG tree on disk, for tests and for trying the ImageFolder path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def write_synthetic_imagefolder(root, num_classes=3, per_class=(12, 4), image_size=32, seed=0,
                                grayscale_every=0) -> Path:
    """Write a small learnable PNG tree root/{train,val}/classX/*.png (for tests and demos)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    coarse = torch.as_tensor(rng.random((num_classes, 3, 4, 4)), dtype=torch.float32)
    protos = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False).numpy()
    written = 0
    for split, count in zip(("train", "val"), per_class):
        for c in range(num_classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(protos[c] + 0.15 * rng.standard_normal(protos[c].shape), 0, 1)
                img = Image.fromarray((pixels.transpose(1, 2, 0) * 255).astype(np.uint8), "RGB")
                written += 1
                if grayscale_every and written % grayscale_every == 0:
                    img = img.convert("L")
                img.save(folder / f"img{i:03d}.png")
    return root


def write_digits_imagefolder(root, image_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """scikit-learn's 1,797 8x8 digits as ``image_size`` PNGs in root/{train,val}/<digit>/ (a
    stratified split): a real dataset in the ImageFolder layout, made offline. Written once
    (a ``done`` marker), so a second call returns at once."""
    from sklearn.datasets import load_digits  # local: sklearn is slow to import
    from sklearn.model_selection import train_test_split

    root = Path(root)
    if (root / "done").exists():
        return root
    digits = load_digits()
    ids = np.arange(len(digits.target))
    train, val = train_test_split(ids, test_size=val_fraction, stratify=digits.target, random_state=seed)
    for split, members in (("train", train), ("val", val)):
        for i in members:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").resize((image_size, image_size), Image.BILINEAR).save(folder / f"{i}.png")
    (root / "done").write_text("written by kd_ray.data.synthetic.write_digits_imagefolder\n")
    return root
