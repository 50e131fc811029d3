"""Datasets, transforms and the teacher/student/distill label policy (no Ray)."""
import re
import shutil

import numpy as np
import pytest
import torch

from kd_ray.config import DataConfig
from kd_ray.data import (
    DATASETS, build_data, convert_imagefolder_to_parquet, describe, labeled_indices,
    write_synthetic_imagefolder,
)
from kd_ray.errors import ConfigError, DataError


def mnist(**kw):
    return DataConfig(name="mnist5k", **kw)


def test_registry_names():
    assert DATASETS.names() == ["digits", "imagefolder", "mnist5k", "parquet", "synthetic"]


def test_unknown_dataset_lists_choices():
    with pytest.raises(ConfigError, match="imagefolder.*mnist5k.*synthetic"):
        describe(DataConfig(name="cifar"))


def test_bad_stage():
    with pytest.raises(ConfigError, match="teacher"):
        build_data(mnist(), "pretrain", 0)


def test_mnist5k_split_is_stratified_and_reproducible():
    b = build_data(mnist(), "teacher", 0)
    assert (len(b.train), len(b.val), b.classes, b.image_size) == (4000, 1000, [str(d) for d in range(10)], 28)
    assert np.bincount(b.train.labels).tolist() == [400] * 10
    assert np.bincount(b.val.labels).tolist() == [100] * 10
    assert -1 not in b.train.labels
    x, y = b.train[0]
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert -1.0 <= x.min() < x.max() <= 1.0 and torch.equal(x[0], x[2])  # gray expanded to 3
    same = build_data(mnist(), "teacher", 0)
    other = build_data(mnist(split_seed=1), "teacher", 0)
    assert torch.equal(same.val[5][0], b.val[5][0])
    assert not torch.equal(torch.stack([other.val[i][0] for i in range(20)]),
                           torch.stack([b.val[i][0] for i in range(20)]))


def test_mnist5k_resize_and_augment():
    b = build_data(mnist(image_size=32, augment=True), "teacher", 0)
    assert b.image_size == 32 and b.train[0][0].shape == (3, 32, 32) and b.val[0][0].shape == (3, 32, 32)
    torch.manual_seed(0)
    shifted = [b.train[3][0] for _ in range(8)]
    assert any(not torch.equal(shifted[0], s) for s in shifted[1:])
    assert torch.equal(b.val[3][0], b.val[3][0])  # val is never augmented


def test_label_policy_per_stage():
    cfg = mnist(labels_per_class=10)
    student = build_data(cfg, "student", seed=0)
    distill = build_data(cfg, "distill", seed=0)
    teacher = build_data(cfg, "teacher", seed=0)
    labelled = np.unique(student.train.indices)
    assert len(student.train) == 4000 and len(labelled) == 100
    full = teacher.train.labels
    assert np.bincount(full[labelled]).tolist() == [10] * 10
    assert np.array_equal(student.train.labels, full[student.train.indices])
    assert np.bincount(student.train.labels).min() >= 390  # repeats spread over classes
    assert len(distill.train) == 4000 and (distill.train.labels != -1).sum() == 100
    assert np.array_equal(np.flatnonzero(distill.train.labels != -1), labelled)
    assert distill.train[int(labelled[0])][1] == full[labelled[0]]
    assert -1 not in full and len(teacher.train) == 4000
    other = build_data(cfg, "distill", seed=1)
    assert not np.array_equal(np.flatnonzero(other.train.labels != -1), labelled)
    assert (other.val.labels == distill.val.labels).all()  # seed never touches val
    plain = build_data(mnist(), "student", seed=0)
    assert len(plain.train) == 4000 and -1 not in plain.train.labels


def test_labeled_indices_too_few():
    with pytest.raises(DataError, match="class 'b' has only 1"):
        labeled_indices([0, 0, 1], 2, seed=0, classes=["a", "b"])


def test_digits():
    b = build_data(DataConfig(name="digits"), "teacher", 0)
    assert len(b.train) + len(b.val) == 1797 and b.num_classes == 10
    assert b.train[0][0].shape == (3, 28, 28)
    assert build_data(DataConfig(name="digits", image_size=16), "teacher", 0).val[0][0].shape == (3, 16, 16)


def test_synthetic_deterministic():
    cfg = DataConfig(name="synthetic", num_classes=4, synthetic_size=40)
    a, b = build_data(cfg, "teacher", 0), build_data(cfg, "teacher", 0)
    assert (len(a.train), len(a.val), a.classes, a.image_size) == (40, 10, ["class0", "class1", "class2", "class3"], 32)
    assert a.train[7][0].shape == (3, 32, 32) and a.train[7][1] == 3
    assert torch.equal(a.train[7][0], b.train[7][0])
    assert not torch.equal(a.train[7][0], a.val[7][0])
    c = build_data(DataConfig(name="synthetic", num_classes=4, synthetic_size=40, split_seed=1), "teacher", 0)
    assert not torch.equal(a.train[7][0], c.train[7][0])
    assert describe(DataConfig(name="synthetic")).classes[-1] == "class9"


@pytest.fixture
def folder(tmp_path):
    return write_synthetic_imagefolder(tmp_path / "img", num_classes=3, per_class=(6, 2), grayscale_every=2)


def test_imagefolder(folder):
    cfg = DataConfig(name="imagefolder", root=str(folder))
    info = describe(cfg)
    assert (info.classes, info.image_size, info.train_count, info.val_count) == (["class0", "class1", "class2"], 224, 18, 6)
    b = build_data(cfg, "teacher", 0)
    assert len(b.train) == 18 and b.num_classes == 3
    gray = next(folder.rglob("img001.png"))  # every 2nd written image is mode "L"
    from PIL import Image
    assert Image.open(gray).mode == "L"
    for i in range(2):  # one RGB and one grayscale source image
        x, y = b.train[i]
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0
    aug = build_data(DataConfig(name="imagefolder", root=str(folder), image_size=64, augment=True), "distill", 0)
    assert aug.train[0][0].shape == (3, 64, 64)


def test_parquet_round_trip(folder, tmp_path):
    rows = convert_imagefolder_to_parquet(folder, tmp_path / "pq")
    assert rows == {"train": 18, "val": 6}
    cfg_img = DataConfig(name="imagefolder", root=str(folder), image_size=32, labels_per_class=2)
    cfg_pq = DataConfig(name="parquet", root=str(tmp_path / "pq"), image_size=32, labels_per_class=2)
    assert describe(cfg_pq) == describe(cfg_img)
    for stage in ("teacher", "distill"):
        a, b = build_data(cfg_img, stage, 3), build_data(cfg_pq, stage, 3)
        assert a.classes == b.classes
        assert np.array_equal(a.train.labels, b.train.labels)
        for i in (0, 7, 17):
            assert torch.equal(a.train[i][0], b.train[i][0])
        assert torch.equal(a.val[5][0], b.val[5][0]) and a.val[5][1] == b.val[5][1]
    with pytest.raises(DataError, match="source split folder .*test not found"):
        convert_imagefolder_to_parquet(folder, tmp_path / "pq2", splits=("train", "test"))
    with pytest.raises(DataError, match="val.parquet not found"):
        shutil.rmtree(tmp_path / "pq" / "val")
        describe(cfg_pq)


def test_describe_errors(folder, tmp_path):
    with pytest.raises(DataError, match="data.root is not set"):
        describe(DataConfig(name="imagefolder"))
    with pytest.raises(DataError, match=f"data.root {re.escape(str(tmp_path / 'nope'))} not found: set data.root"):
        describe(DataConfig(name="imagefolder", root=str(tmp_path / "nope")))
    with pytest.raises(DataError, match=r"dataset has 3 classes \(class0, class1, class2\) but data.num_classes=10"):
        describe(DataConfig(name="imagefolder", root=str(folder), num_classes=10))
    with pytest.raises(DataError, match="labels_per_class=7 but class 'class0' has only 6"):
        describe(DataConfig(name="imagefolder", root=str(folder), labels_per_class=7))
    with pytest.raises(DataError, match="labels_per_class=500"):
        describe(mnist(labels_per_class=500))
    with pytest.raises(DataError, match="split folder .*valid not found: set data.val_split"):
        describe(DataConfig(name="imagefolder", root=str(folder), val_split="valid"))
    (folder / "val" / "class3").mkdir()
    (folder / "val" / "class0" / "img000.png").rename(folder / "val" / "class3" / "img000.png")
    with pytest.raises(DataError, match="train and val classes differ"):
        describe(DataConfig(name="imagefolder", root=str(folder)))
    (folder / "train" / "class3").mkdir()
    with pytest.raises(DataError, match="class folder .*class3 holds no image files"):
        describe(DataConfig(name="imagefolder", root=str(folder)))


def test_corrupt_image(folder):
    bad = folder / "train" / "class1" / "img000.png"
    bad.write_bytes(b"not a png at all")
    b = build_data(DataConfig(name="imagefolder", root=str(folder)), "teacher", 0)  # listing only
    index = [str(p) for p, _ in b.train.raw.samples].index(str(bad))
    with pytest.raises(DataError, match=f"cannot read image {re.escape(str(bad))}.*delete or replace"):
        b.train[index]


def test_dataset_plugin_by_module_path():
    cfg = DataConfig(name="tests.plugins:two_blobs", image_size=8)
    info = describe(cfg)
    assert info.classes == ["dark", "bright"] and (info.train_count, info.val_count) == (32, 8)
    bundle = build_data(cfg, "teacher", 0)
    image, label = bundle.train[1]
    assert image.shape == (3, 8, 8) and label == 1
