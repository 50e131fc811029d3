"""data.decoder: torchvision.io + transforms.v2 against the default PIL path (no Ray)."""
import numpy as np
import pytest
import torch
from PIL import Image

from kd_ray.config import Config, DataConfig
from kd_ray.data import build_data, write_synthetic_imagefolder
from kd_ray.data.datasets import IMAGENET_STD
from kd_ray.errors import ConfigError, DataError

ONE_LEVEL = 1.001 / 255 / min(IMAGENET_STD)  # one uint8 step after Normalize


def jpeg_folder(root, per_class=(3, 2)):
    """Smooth 96x72 photo-like JPEGs (q 95) in root/{train,val}/class{0,1}/."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
                coarse.resize((96, 72), Image.BICUBIC).save(folder / f"img{i}.jpg", quality=95)
    return root


def both(root, **kw):
    return [build_data(DataConfig(name="imagefolder", root=str(root), image_size=32, decoder=d, **kw),
                       "teacher", 0) for d in ("pil", "torchvision")]


def test_val_images_match_pil(tmp_path):
    pil, tv = both(jpeg_folder(tmp_path))
    assert len(pil.val) == len(tv.val) == 4 and pil.norm == tv.norm
    for k in range(len(pil.val)):
        (a, la), (b, lb) = pil.val[k], tv.val[k]
        assert la == lb and a.shape == b.shape == (3, 32, 32) and a.dtype == b.dtype == torch.float32
        # Same libjpeg decode; resizing differs by at most one grey level (uint8 vs PIL rounding).
        assert (a - b).abs().mean() < 0.002 and (a - b).abs().max() <= ONE_LEVEL


def test_augmented_train_images_replay_the_same_crop_and_flip(tmp_path):
    pil, tv = both(jpeg_folder(tmp_path), augment=True)
    for k in range(len(pil.train)):
        torch.manual_seed(k)
        a, _ = pil.train[k]
        torch.manual_seed(k)
        b, _ = tv.train[k]
        torch.manual_seed(k + 100)
        other, _ = tv.train[k]
        assert a.shape == b.shape == (3, 32, 32)
        # The same random crop and flip from the same seed: pixels within one grey level.
        assert (a - b).abs().mean() < 0.002 and (a - b).abs().max() <= ONE_LEVEL
        assert (a - other).abs().mean() > 0.1  # another seed, another view


def test_grayscale_png_and_bmp_become_three_channels(tmp_path):
    root = write_synthetic_imagefolder(tmp_path, num_classes=2, per_class=(3, 1), grayscale_every=2)
    Image.new("L", (40, 30), 128).save(root / "train" / "class0" / "extra.bmp")
    _, tv = both(root)
    images = [tv.train[k][0] for k in range(len(tv.train))]
    assert len(images) == 7 and all(x.shape == (3, 32, 32) for x in images)
    assert tv.train.raw[0][0].dtype == torch.uint8  # decoded by torchvision.io, not PIL


def test_broken_jpeg_is_a_data_error(tmp_path):
    root = jpeg_folder(tmp_path)
    (root / "train" / "class0" / "img0.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    _, tv = both(root)
    with pytest.raises(DataError, match="cannot read image .*img0.jpg.*replace the file"):
        tv.train[0]


def test_decoder_values_are_checked():
    with pytest.raises(ConfigError, match="data.decoder='cv2': choose one of pil, torchvision"):
        DataConfig(name="imagefolder", decoder="cv2")
    with pytest.raises(ConfigError, match="imagefolder only"):
        Config.from_dict({"data": {"name": "parquet", "decoder": "torchvision"}})


def test_teacher_cache_of_one_decoder_is_stale_for_the_other(tmp_path):
    from kd_ray import cache as teacher_cache

    root = jpeg_folder(tmp_path / "data")
    (tmp_path / "teacher.pt").write_bytes(b"weights")

    def want(decoder):
        return teacher_cache.wanted(Config.from_dict({
            "data": {"name": "imagefolder", "root": str(root), "augment": True, "decoder": decoder},
            "distill": {"teacher_path": str(tmp_path / "teacher.pt")}}))

    pil, tv = want("pil"), want("torchvision")
    assert "decoder" not in pil["transform"]  # caches built before data.decoder existed still fit
    assert tv["transform"]["decoder"] == "torchvision"
    assert teacher_cache.mismatch(pil, tv) == "it was built for another transform/augmentation settings"
    assert teacher_cache.mismatch(tv, want("torchvision")) is None
