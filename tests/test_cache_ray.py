"""`kd-ray cache-teacher` on Ray workers, then a sweep whose trials only read the cache."""
import json

import torch
import yaml

from kd_ray.runs.files import read_history
from kd_ray.models import build_model, export_teacher
from test_tune_ray import kd_ray


def test_cache_is_built_once_on_ray_and_every_trial_reads_it(cli_env, tmp_path):
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    export_teacher(teacher, build_model("simple_cnn", 4), "simple_cnn", [f"class{c}" for c in range(4)], 16)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"name": "synthetic", "num_classes": 4, "synthetic_size": 96, "image_size": 16,
                 "augment": True},
        "model": {"student": "tiny_cnn"},
        "distill": {"loss": "kd", "teacher_path": str(teacher), "cache_views": 2},
        "optim": {"epochs": 3, "batch_size": 32},
        "run": {"name": "cached", "storage": str(tmp_path / "results"), "num_workers": 1},
        "sweep": {"space": {"distill.temperature": [2, 8]}, "scheduler": "none"},
    }))
    cache = tmp_path / "cache"
    built = kd_ray(cli_env, "cache-teacher", "-c", config, "--out", cache)
    assert built.returncode == 0, built.stderr[-3000:]
    assert f"distill.teacher_cache={cache}" in built.stdout
    manifest = json.loads((cache / "manifest.json").read_text())
    # One teacher pass per (image, view), spread over the build's workers.
    assert manifest["teacher_forwards"] == manifest["rows"] == 96 * 2

    swept = kd_ray(cli_env, "tune", "-c", config, "--set", f"distill.teacher_cache={cache}")
    assert swept.returncode == 0, swept.stderr[-3000:]
    assert "up to date" in swept.stdout and "through the teacher" not in swept.stdout
    trials = sorted((tmp_path / "results" / "cached" / "trials").iterdir())
    assert len(trials) == 2
    for trial in trials:
        history = read_history(trial)
        assert [h["epoch"] for h in history] == [1, 2, 3]
        # 3 epochs x 2 trials of distillation, and the teacher ran on no image.
        assert all(h["perf/teacher_images"] == 0 for h in history)
        assert all(h["train/kd"] > 0 for h in history)
    assert json.loads((cache / "manifest.json").read_text())["created"] == manifest["created"]
