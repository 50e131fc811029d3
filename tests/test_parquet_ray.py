"""A Parquet table written by Ray Data (a folder of shards, no kd_ray metadata) trains as is."""
import ray

from kd_ray.cluster.stage import run_stage
from kd_ray.config import load_config
from kd_ray.data import write_synthetic_imagefolder
from kd_ray.data.parquet import ParquetImages, split_files
from kd_ray.runs.files import read_history


def test_a_sharded_table_written_by_ray_data_trains_as_is(ray_cluster, tmp_path):
    tree = write_synthetic_imagefolder(tmp_path / "img", num_classes=3, per_class=(16, 6), image_size=16)
    table = tmp_path / "table"
    for split in ("train", "val"):
        items = [{"image": p.read_bytes(), "label": int(p.parent.name.removeprefix("class"))}
                 for p in sorted((tree / split).rglob("*.png"))]
        ray.data.from_items(items).repartition(3).write_parquet(str(table / split))
    files = split_files(table, "train")
    assert len(files) >= 2 and len(ParquetImages(files)) == 48
    cfg = load_config(overrides=[
        "data.name=parquet", f"data.root={table}", "data.image_size=16", "data.augment=true",
        "model.teacher=tiny_cnn", f"run.storage={tmp_path / 'results'}", "run.num_workers=2",
        "optim.epochs=2", "optim.batch_size=8", "run.name=rd"])
    history = read_history(run_stage(cfg, "teacher").run_dir)
    assert [h["epoch"] for h in history] == [1, 2]
    # Summed over both ranks' disjoint val shares: a multiple of 1/18 (3 classes x 6 images).
    assert all(abs(h["val/top1"] * 18 - round(h["val/top1"] * 18)) < 1e-9 for h in history)
