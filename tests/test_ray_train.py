"""Ray Train end to end: 2-worker DDP distillation, resume after a killed driver, the pipeline.

These share one Ray instance (the session fixture); each TorchTrainer run costs ~20 s of start-up.
"""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kd_ray.config import load_config
from kd_ray.errors import DataError, NonFiniteLossError
from kd_ray.data import write_synthetic_imagefolder
from kd_ray.launch import read_history, run_stage
from kd_ray.models import build_model, export_teacher, load_teacher


def tb_tags(folder: Path) -> set:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return set(acc.Tags()["scalars"]), acc


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A PNG ImageFolder tree on disk: 5 classes, some grayscale images."""
    root = tmp_path_factory.mktemp("tree")
    write_synthetic_imagefolder(root, num_classes=5, per_class=(24, 8), image_size=32, grayscale_every=5)
    return root


def tree_config(tree, tmp_path, *extra):
    return load_config(overrides=[
        "data.name=imagefolder", f"data.root={tree}", "data.image_size=32",
        "model.teacher=tiny_cnn", "model.student=tiny_cnn", f"run.storage={tmp_path / 'results'}",
        "run.num_workers=2", "optim.batch_size=16", "optim.lr=0.05", *extra,
    ])


def test_two_worker_distillation_writes_checkpoints_and_tensorboard(ray_cluster, tree, tmp_path):
    classes = sorted(p.name for p in (tree / "train").iterdir())
    torch.manual_seed(0)
    teacher_path = tmp_path / "teacher.pt"
    export_teacher(teacher_path, build_model("tiny_cnn", len(classes)), "tiny_cnn", classes, 32)
    before = {k: v.clone() for k, v in load_teacher(teacher_path)[0].state_dict().items()}
    cfg = tree_config(tree, tmp_path, "optim.epochs=2", f"distill.teacher_path={teacher_path}",
                      "distill.loss=kd", "run.name=kd2")
    result = run_stage(cfg, "distill", verbose=False)

    run_dir = tmp_path / "results" / "kd2"
    assert result.run_dir == run_dir
    assert len(list(run_dir.glob("checkpoint_2*"))) == 2  # one per epoch, keep_checkpoints=2
    history = read_history(run_dir)
    assert [h["epoch"] for h in history] == [1, 2]
    # Accuracy comes from counts summed over both ranks: a multiple of 1/40 (5 classes x 8 images).
    assert all(abs(h["val/top1"] * 40 - round(h["val/top1"] * 40)) < 1e-9 for h in history)
    tags, acc = tb_tags(run_dir / "tensorboard")
    assert {"train/loss", "train/kd", "train/ce", "val/loss", "val/top1", "val/top5",
            "perf/images_per_s", "perf/epoch_seconds", "lr"} <= tags
    assert [e.step for e in acc.Scalars("val/top1")] == [1, 2]
    assert (run_dir / "config.yaml").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "distill" and summary["epochs"] == 2 and summary["params"] > 0
    # The checkpoint holds everything needed to resume and to identify the run.
    state = torch.load(Path(summary["checkpoint"]) / "state.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "epoch", "classes", "config"} <= set(state)
    assert state["classes"] == classes and state["epoch"] == 2
    after = load_teacher(teacher_path)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # teacher file untouched


def kd_ray(*args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "kd_ray.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_killed_run_resumes_from_last_epoch(cli_env, tmp_path):
    """SIGKILL the driver mid-run; the same command again continues after the last checkpoint."""
    args = ["train-student", "--set", "data.name=synthetic", "--set", "data.synthetic_size=4096",
            "--set", "model.student=simple_cnn", "--set", "optim.epochs=40",
            "--set", f"run.storage={tmp_path}", "--set", "run.name=resume"]
    run_dir = tmp_path / "resume"
    proc = subprocess.Popen([sys.executable, "-m", "kd_ray.cli", *args], env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_history(run_dir)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = read_history(run_dir)
    assert 2 <= len(done) < 40, "the run must be interrupted mid-way"
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    assert snapshot  # Ray recorded the checkpoints it finished

    out = kd_ray(*args, "--set", "optim.epochs=" + str(len(done) + 2), env=cli_env)
    assert out.returncode == 0, out.stderr[-3000:]
    history = read_history(run_dir)
    epochs = [h["epoch"] for h in history]
    assert epochs == list(range(1, len(done) + 3))
    # Only the missing epochs were trained again: the first lines are the originals.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["epoch"] for r in rows[len(done):]]
    assert resumed[0] <= len(done) + 1 and resumed[-1] == len(done) + 2
    assert len(resumed) <= 3  # at most one epoch (the one killed mid-way) is redone


def test_pipeline_cli_writes_comparison_plot_and_report(cli_env, tree, tmp_path):
    args = ["pipeline", "--set", "data.name=imagefolder", "--set", f"data.root={tree}",
            "--set", "data.image_size=32", "--set", "model.teacher=simple_cnn",
            "--set", "model.student=tiny_cnn", "--set", "data.labels_per_class=8",
            "--set", "optim.epochs=2", "--set", f"run.storage={tmp_path}", "--set", "run.name=pipe"]
    out = kd_ray(*args, env=cli_env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    root = tmp_path / "pipe"
    assert "epoch 2/2" in out.stdout and "student, distilled" in out.stdout
    for run in ("teacher", "student-seed0", "distill-seed0"):
        assert (root / run / "summary.json").is_file()
        assert list((root / run / "tensorboard").glob("events.out.tfevents.*"))
    assert (root / "teacher" / "teacher.pt").is_file()
    table = (root / "comparison.md").read_text()
    assert "teacher" in table and "labels only" in table and "distilled" in table
    assert (root / "accuracy.png").stat().st_size > 10_000
    (root / "comparison.md").unlink()
    again = kd_ray("report", str(root), env=cli_env)
    assert again.returncode == 0 and (root / "comparison.md").read_text() == table


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_epoch_one(ray_cluster, tmp_path):
    classes = [f"class{i}" for i in range(10)]
    teacher_path = tmp_path / "teacher.pt"
    export_teacher(teacher_path, build_model("tiny_cnn", 10), "tiny_cnn", classes, 32)
    cfg = load_config(overrides=[
        "data.name=synthetic", "data.synthetic_size=64", "optim.batch_size=16", "optim.epochs=3",
        "model.student=tiny_cnn", "distill.loss=tests.plugins:nan_in_second_epoch",
        f"distill.teacher_path={teacher_path}", f"run.storage={tmp_path}", "run.name=nan"])
    with pytest.raises(NonFiniteLossError, match=r"epoch 2 step 0"):
        run_stage(cfg, "distill", verbose=False)
    assert [h["epoch"] for h in read_history(tmp_path / "nan")] == [1]
    assert len(list((tmp_path / "nan").glob("checkpoint_2*"))) == 1  # epoch 1 survives


def test_corrupt_image_stops_the_run_naming_the_file(ray_cluster, tree, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    bad = root / "train" / "class2" / "broken.png"
    bad.write_bytes(b"not a png at all")
    cfg = tree_config(root, tmp_path, "optim.epochs=1", "run.name=corrupt")
    with pytest.raises(DataError, match="broken.png"):
        run_stage(cfg, "student", verbose=False)
