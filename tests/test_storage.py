"""run.storage on an object store: run files, checkpoints, the teacher cache and reports on a real
S3-compatible server (moto on 127.0.0.1), without Ray."""
import json
import os
import subprocess
import sys

import pytest
import torch

from kd_ray import cache as teacher_cache
from kd_ray.config import load_config
from kd_ray.config.checks import check_paths
from kd_ray.engine import checkpoints
from kd_ray.errors import ConfigError
from kd_ray.models import build_model, export_teacher, read_teacher_info
from kd_ray.runs.files import (append_failure, append_metrics, backfill, finished_summary, read_failures,
                               read_history, written_epochs)
from kd_ray.runs.report import find_runs, write_report
from kd_ray.runs.stages import fresh_name
from kd_ray.storage import RemotePath, location

from test_recovery import _Planted, history, state


def test_location_keeps_local_paths_as_paths(tmp_path):
    assert location(str(tmp_path)) == tmp_path and location(f"file://{tmp_path}") == tmp_path


def test_checkpoints_on_s3_are_saved_found_and_loaded_tensors_only(s3_bucket):
    run = location(f"{s3_bucket}/runs/r1")
    assert isinstance(run, RemotePath) and checkpoints.latest(run) is None
    older = checkpoints.save(run, state(1), history([1]))
    newer = checkpoints.save(run, state(2), history([1, 2]))
    assert str(newer).startswith(f"{s3_bucket}/runs/r1/checkpoint_2")
    assert [f.name for f in checkpoints.folders(run)] == [newer.name, older.name]
    folder, manifest, loaded = checkpoints.latest(str(run), with_state=True)
    assert folder == newer and manifest["history"] == history([1, 2]) and loaded["epoch"] == 2
    assert torch.equal(loaded["model"]["w"], torch.full((64,), 2.0))
    # A copy cut short (manifest there, state.pt missing) and a planted payload are both skipped.
    (newer / "state.pt").unlink()
    assert checkpoints.latest(run)[0] == older
    marker = location(f"{s3_bucket}/pwned")
    import io

    buffer = io.BytesIO()
    torch.save({"model": _Planted(os.devnull)}, buffer)
    (older / "state.pt").write_bytes(buffer.getvalue())
    manifest = json.loads((older / "manifest.json").read_text())
    (older / "manifest.json").write_text(json.dumps({**manifest, "state_bytes": len(buffer.getvalue())}))
    with pytest.raises(checkpoints.BadCheckpoint, match="refused"):
        checkpoints.load(older)
    assert not marker.exists()
    assert fresh_name(location(f"{s3_bucket}/runs"), "r1") == "r1-2"
    assert fresh_name(f"{s3_bucket}/runs", "r9") == "r9"


def test_run_files_on_s3_append_read_and_backfill_tensorboard(s3_bucket):
    run = f"{s3_bucket}/r"
    for row in history([1, 2]):
        append_metrics(run, row)
    assert written_epochs(run) == {1, 2}
    assert [r["epoch"] for r in backfill(run, history([1, 2, 3]))] == [3]
    assert [h["epoch"] for h in read_history(run)] == [1, 2, 3]
    assert location(run + "/tensorboard").glob("events.out.tfevents.*")  # copied to storage
    append_failure(run, {"0": "OSError: x"})
    assert read_failures(run)[0]["errors"] == {"0": "OSError: x"}
    assert finished_summary(run, 3) is None
    (location(run) / "summary.json").write_text(json.dumps({"epochs": 3}))
    assert finished_summary(run, 3) == {"epochs": 3}


def test_report_reads_and_writes_runs_on_s3(s3_bucket):
    run = location(f"{s3_bucket}/p/distill-seed0")
    for row in history([1, 2]):
        append_metrics(run, row)
    summary = {"stage": "distill", "arch": "tiny_cnn", "params": 10, "final": {"val/top1": 0.2},
               "images_per_s": 5.0}
    (run / "summary.json").write_text(json.dumps(summary))
    table = write_report(f"{s3_bucket}/p", find_runs([f"{s3_bucket}/p"]))
    assert "student, distilled" in table
    assert (location(f"{s3_bucket}/p") / "comparison.md").read_text().startswith("| model")
    assert (location(f"{s3_bucket}/p") / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_teacher_file_and_cache_on_s3(s3_bucket, tmp_path):
    classes = [f"class{c}" for c in range(10)]
    teacher = f"{s3_bucket}/teacher.pt"
    torch.manual_seed(0)
    export_teacher(teacher, build_model("tiny_cnn", 10), "tiny_cnn", classes, 16)
    assert read_teacher_info(teacher)["classes"] == classes
    cfg = load_config(overrides=["data.name=synthetic", "data.synthetic_size=40", "data.image_size=16",
                                 f"distill.teacher_path={teacher}", "data.augment=true", "distill.cache_views=2",
                                 "run.num_workers=2", f"run.storage={s3_bucket}/results"])
    path = f"{s3_bucket}/results/teacher_cache"
    resolved = teacher_cache.resolve(cfg, path)
    assert resolved.distill.teacher_cache == path
    assert teacher_cache.read_manifest(path)["rows"] == 80
    cached = teacher_cache.load(path)
    assert cached.samples == 40 and cached.views == 2 and cached.num_classes == 10
    assert teacher_cache.resolve(cfg, path).distill.teacher_cache == path  # up to date: no rebuild


def test_a_missing_bucket_or_unknown_scheme_is_one_line_before_anything_runs(s3_server, tmp_path):
    cfg = load_config(overrides=["data.name=synthetic", "run.storage=s3://no-such-bucket/runs"])
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' not found"):
        check_paths(cfg, ("student",))
    with pytest.raises(ConfigError, match="run.storage"):
        check_paths(cfg.replace(run={"storage": "nosuchfs://x/y"}), ("student",))
    done = subprocess.run([sys.executable, "-m", "kd_ray.cli", "train-student", "--set", "data.name=synthetic",
                           "--set", "run.storage=s3://no-such-bucket/runs"], capture_output=True, text=True,
                          env=dict(os.environ), timeout=120, cwd=tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(errors) == 1 and "no-such-bucket" in errors[0], done.stderr
