"""Streaming reads without Ray: sharded Parquet tables by row group, the row-group aware epoch
order, and the teacher cache read a row at a time."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kd_ray.cache import rows as cache_rows
from kd_ray.cache.store import choose_encoding
from kd_ray.config import DataConfig
from kd_ray.data import build_data, convert_imagefolder_to_parquet, describe, write_synthetic_imagefolder
from kd_ray.data import parquet
from kd_ray.data.parquet import ParquetImages, split_files
from kd_ray.data.sampling import ShuffleSampler, epoch_order
from kd_ray.data.views import ReplayViews
from kd_ray.engine import make_loaders
from kd_ray.errors import DataError


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), value % 256, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_table(folder, rows: int, group_rows: int, files: int, classes=None):
    """``files`` shards of ``group_rows``-row groups; pixel value = row number % 256."""
    folder.mkdir(parents=True)
    meta = {parquet.CLASSES_KEY: json.dumps(classes).encode()} if classes else None
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for f in range(files):
        ids = range(bounds[f], bounds[f + 1])
        table = pa.table({"image": [png(i) for i in ids], "label": [i % 3 for i in ids]})
        pq.write_table(table.replace_schema_metadata(meta), folder / f"{f:03d}_shard.parquet",
                       row_group_size=group_rows)
    return folder


def pixel(item) -> int:
    return int(np.asarray(item[0])[0, 0, 0])


def test_a_split_may_be_a_file_a_folder_of_shards_or_a_spark_folder(tmp_path):
    write_table(tmp_path / "a" / "train", 50, 8, 3)
    (tmp_path / "a" / "train" / "_SUCCESS").write_text("")
    (tmp_path / "a" / "train" / ".hidden.parquet").write_text("junk")
    write_table(tmp_path / "b" / "train.parquet", 50, 8, 2)
    pq.write_table(pa.table({"image": [png(1)], "label": [0]}), tmp_path / "b" / "val.parquet")
    assert len(split_files(tmp_path / "a", "train")) == 3
    assert len(split_files(tmp_path / "b", "train")) == 2 and len(split_files(tmp_path / "b", "val")) == 1
    table = ParquetImages(split_files(tmp_path / "a", "train"))
    assert len(table) == 50 and [pixel(table[i]) for i in (0, 17, 49)] == [0, 17, 49]
    assert table[17][1] == 17 % 3
    # Without kd_ray.classes metadata (e.g. written by Ray Data) the classes are the label numbers.
    assert describe(DataConfig(name="parquet", root=str(tmp_path / "b"))).classes == ["0", "1", "2"]


def test_reader_holds_a_bounded_number_of_row_groups(tmp_path):
    files = split_files(write_table(tmp_path / "t" / "train", 200, 10, 3).parent, "train")
    table = ParquetImages(files, cached_groups=4)
    sampler = ShuffleSampler(table, num_replicas=1, rank=0, seed=1, window=4)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        before = table.reads
        seen = [table[i][1] for i in sampler]
        assert len(seen) == 200
        # Each of the 21 row groups read once per epoch (one may still be held from the last).
        assert len(table.where) == 21 and 20 <= table.reads - before <= 21
    assert table.most_held <= 4


def test_epoch_order_is_exact_reproducible_and_keeps_row_groups_together():
    groups = np.repeat(np.arange(25, dtype=np.int32), 8)
    a, b = epoch_order(200, groups, 7, 3, window=4), epoch_order(200, groups, 7, 3, window=4)
    assert np.array_equal(a, b) and np.array_equal(np.sort(a), np.arange(200))
    assert not np.array_equal(a, epoch_order(200, groups, 7, 4, window=4))  # a new order per epoch
    assert not np.array_equal(a[:32], np.sort(a[:32]))  # shuffled within a window
    for w in range(0, 200, 32):  # each window of 32 items spans 4 row groups
        assert len(set(groups[a[w:w + 32]])) <= 4
    free = epoch_order(200, None, 7, 3)
    assert np.array_equal(np.sort(free), np.arange(200))


@pytest.mark.parametrize("n, world", [(200, 2), (203, 4), (5, 3)])
def test_ranks_get_distinct_rows_and_equal_counts(n, world):
    data = list(range(n))
    shares = [list(ShuffleSampler(data, num_replicas=world, rank=r, seed=0)) for r in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == -(-n // world)
    everything = sum(shares, [])
    assert set(everything) == set(range(n))
    assert len(everything) - len(set(everything)) == len(everything) - n  # only the padding repeats


def test_convert_writes_bounded_shards_that_train_like_the_folder(tmp_path, monkeypatch):
    folder = write_synthetic_imagefolder(tmp_path / "img", num_classes=3, per_class=(10, 4))
    monkeypatch.setattr(parquet, "GROUP_ROWS", 4)
    rows = convert_imagefolder_to_parquet(folder, tmp_path / "pq", shard_mb=0.001)
    assert rows == {"train": 30, "val": 12}
    shards = sorted((tmp_path / "pq" / "train").glob("part-*.parquet"))
    assert len(shards) > 2 and all(pq.ParquetFile(f).metadata.num_row_groups == 1 for f in shards)
    cfg_img = DataConfig(name="imagefolder", root=str(folder), image_size=32, augment=True)
    cfg_pq = DataConfig(name="parquet", root=str(tmp_path / "pq"), image_size=32, augment=True)
    a, b = build_data(cfg_img, "distill", 0), build_data(cfg_pq, "distill", 0)
    assert a.classes == b.classes and np.array_equal(a.train.labels, b.train.labels)
    ra, rb = ReplayViews(a.train, 2, 0), ReplayViews(b.train, 2, 0)
    for flat in (3, 30 + 17, 59):  # replayed augmented views match pixel for pixel
        assert torch.equal(ra[flat][0], rb[flat][0])
    train, sampler, val = make_loaders(b, 8, rank=1, world=2, seed=0, workers=0)
    sampler.set_epoch(1)
    assert sum(len(x) for x, _ in train) == 12 and sum(len(y) for _, y in val) == 6


def test_views_leave_the_callers_random_stream_alone(tmp_path):
    write_synthetic_imagefolder(tmp_path / "img", num_classes=2, per_class=(3, 1))
    data = build_data(DataConfig(name="imagefolder", root=str(tmp_path / "img"), image_size=16,
                                 augment=True), "distill", 0)
    replay = ReplayViews(data.train, 3, 0)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    got = [torch.rand(1), replay[4][0], torch.rand(1), replay[2][0], torch.rand(1)]
    assert torch.equal(torch.cat([got[0], got[2], got[4]]), expected)


def test_cache_rows_round_trip_and_are_read_from_disk(tmp_path):
    logits = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    for top_k, encoding, shards in ((None, None, [0, 4, 10]), (2, None, [0, 10]), (None, "int8", [0, 3, 10])):
        folder = tmp_path / f"k{top_k}{encoding or ''}"
        folder.mkdir()
        for s in range(len(shards) - 1):
            writer = cache_rows.ShardWriter(folder, s, shards[s + 1] - shards[s], 6, top_k, encoding)
            writer.add(logits[shards[s]:shards[s + 1]])
            writer.close()
        cache = cache_rows.CachedLogits(folder, 5, 2, 6, shards)
        assert cache.complete()
        row = cache.row(3, 1)  # flat id 8
        if encoding == "int8":
            step = (logits[8].max() - logits[8].min()) / 255
            assert cache.nbytes_per_row() == 6 + 4 + 4 and row.dtype == torch.float32
            assert (row - torch.from_numpy(logits[8])).abs().max() <= step / 2 + 1e-6
            assert row.max().item() == pytest.approx(float(logits[8].max()), abs=1e-5)
            assert torch.equal(cache.row(0, 0), torch.from_numpy(cache_rows.roundtrip(logits[:1], "int8")[0]))
        elif top_k is None:
            assert row.dtype == torch.float16 and torch.allclose(row.float(), torch.from_numpy(logits[8]), atol=1e-2)
        else:
            probs, live = row.softmax(0), torch.from_numpy(logits[8]).softmax(0)
            top = live.topk(2).indices
            assert torch.allclose(probs[top], live[top], atol=1e-3)
    # Nothing is kept in memory: a row changed on disk reads back changed.
    path = cache_rows.shard_file(tmp_path / "kNone", 1, "logits")
    data = bytearray(path.read_bytes())
    data[-12:] = np.full(6, 7.0, dtype=np.float16).tobytes()
    dense = cache_rows.CachedLogits(tmp_path / "kNone", 5, 2, 6, [0, 4, 10])
    before = dense.row(4, 1)
    path.write_bytes(bytes(data))
    assert not torch.equal(before, dense.row(4, 1))
    assert torch.equal(dense.row(4, 1), torch.full((6,), 7.0, dtype=torch.float16))


def test_cache_encoding_is_chosen_by_size():
    """Size no longer chooses (the name is kept from when it did, top-32 past 1 GiB): dense
    float16 whatever the size, unless distill.cache_encoding (or cache_top_k) asks."""
    assert choose_encoding(1000, None, None) == ("float16", None)
    assert choose_encoding(1000, "int8", None) == ("int8", None)
    assert choose_encoding(1000, "topk", None) == ("topk", 32)
    assert choose_encoding(1000, None, 5) == ("topk", 5)  # cache_top_k alone: top-k, as before
    assert choose_encoding(10, "topk", 10) == ("float16", None)  # k >= classes: dense


def test_an_imagenet_sized_cache_over_1_gib_is_dense_float16(monkeypatch):
    from kd_ray.cache import store
    from kd_ray.config import load_config

    # ImageNet-1k: 1.28 M images x 4 views x 1,000 classes x 2 bytes = 10 GB of float16
    monkeypatch.setattr(store, "_data_facts", lambda cfg: ("digest", 1_281_167, 1000))
    monkeypatch.setattr(store, "teacher_fingerprint", lambda cfg: "sha")
    cfg = load_config(overrides=["data.augment=true", "distill.cache_views=4"])
    assert store.num_views(cfg) * 1_281_167 * 1000 * 2 > 2**30
    want = store.wanted(cfg)
    assert (want["encoding"], want["top_k"]) == ("float16", None)
    asked = store.wanted(cfg.replace(distill={"cache_encoding": "topk"}))
    assert (asked["encoding"], asked["top_k"]) == ("topk", 32)
    assert store.mismatch(dict(want, encoding="dense"), want) is None  # a manifest from before: same
    assert "distill.cache_encoding" in store.mismatch(dict(want, encoding="int8"), want)


def test_a_corrupt_image_names_its_file_and_row(tmp_path):
    folder = tmp_path / "t" / "train"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"image": [png(1), b"not a png"], "label": [0, 1]}), folder / "a.parquet")
    table = ParquetImages(split_files(tmp_path / "t", "train"))
    assert pixel(table[0]) == 1
    with pytest.raises(DataError, match=r"cannot read image a.parquet row 1 \(row 1 of row group 0\)"):
        table[1]


def test_cli_convert_writes_shards(tmp_path, capsys):
    from kd_ray import cli

    folder = write_synthetic_imagefolder(tmp_path / "img", num_classes=2, per_class=(3, 1))
    assert cli.main(["convert", str(folder), str(tmp_path / "pq"), "--shard-mb", "64"]) == 0
    assert "train: 6 images" in capsys.readouterr().out
    assert describe(DataConfig(name="parquet", root=str(tmp_path / "pq"))).train_count == 6
    (tmp_path / "pq" / "val" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds other files"):
        convert_imagefolder_to_parquet(folder, tmp_path / "pq")
    assert (tmp_path / "pq" / "val" / "notes.txt").exists()
