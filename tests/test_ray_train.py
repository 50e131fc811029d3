"""Ray Train end to end: 2-worker DDP distillation, the pipeline CLI.

These share one Ray instance (the session fixture); each TorchTrainer run costs ~20 s of start-up.
Killed workers and drivers, NaN losses and corrupt images: tests/test_chaos.py.
"""
import json
from pathlib import Path

import pytest
import torch

import gloo
import method_ranks
from test_tune_ray import kd_ray_here

from kd_ray.config import load_config
from kd_ray.data import write_synthetic_imagefolder
from kd_ray.engine import checkpoints
from kd_ray.cluster.stage import make_loop_config, run_stage
from kd_ray.deploy.evaluate import evaluate_target
from kd_ray.deploy.export import export
from kd_ray.errors import RunFailedError
from kd_ray.runs.files import read_failures, read_history
from kd_ray.testing.faults import ENV as FAULTS_ENV, read_events
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
    result = run_stage(cfg, "distill")

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
    assert "train_step/loss" in tb_tags(run_dir / "tensorboard" / "steps")[0]  # rank 0's step curve
    assert (run_dir / "config.yaml").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "distill" and summary["epochs"] == 2 and summary["params"] > 0
    # The checkpoint holds everything needed to resume and to identify the run.
    state, _ = checkpoints.load(summary["checkpoint"])  # state.pt tensors-only, the rest JSON
    assert {"model", "method", "optimizer", "scheduler", "epoch", "classes", "config"} <= set(state)
    assert state["classes"] == classes and state["epoch"] == 2
    after = load_teacher(teacher_path)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # teacher file untouched
    # The run leaves as a model: `eval` gives its last validation numbers (2 ranks summed), the
    # TorchScript export matches PyTorch (ONNX exports: tests/test_deploy.py).
    metrics, _, _ = evaluate_target(run_dir, out=tmp_path / "eval")
    assert (metrics["top1"], metrics["top5"]) == (history[-1]["val/top1"], history[-1]["val/top5"])
    assert 0 <= metrics["teacher_agreement"] <= 1
    assert export(run_dir, "torchscript", tmp_path / "kd2.pt")[1]["max_abs_diff"] < 1e-4


def one_worker(tree, tmp_path, monkeypatch, name, *faults, extra=()):
    """A 1-worker student run (run.runner auto: one Ray task) with a fault plan; its events."""
    events = tmp_path / f"{name}-faults"
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"dir": str(events), "faults": list(faults)}))
    cfg = tree_config(tree, tmp_path, "run.num_workers=1", "optim.epochs=3", f"run.name={name}", *extra)
    return cfg, tmp_path / "results" / name, events


def test_one_worker_stage_trains_in_one_task_and_resumes_a_killed_attempt(ray_cluster, tree, tmp_path,
                                                                        monkeypatch):
    kill = {"kind": "kill", "rank": 0, "epoch": 2, "step": 1, "once": True}
    cfg, run_dir, events = one_worker(tree, tmp_path, monkeypatch, "solo", kill)
    result = run_stage(cfg, "student")

    attempts = [e for e in read_events(events) if e["event"] == "attempt"]
    assert [a["start_epoch"] for a in attempts] == [1, 2]  # the retry starts from epoch 1's checkpoint
    assert [r["epoch"] for r in read_history(run_dir)] == [1, 2, 3]  # each epoch logged once
    failures = read_failures(run_dir)
    assert len(failures) == 1 and "WorkerCrashedError" in failures[0]["errors"]["0"]
    assert result.summary["epochs"] == 3 and len(checkpoints.folders(run_dir)) == 2
    tags, _ = tb_tags(run_dir / "tensorboard")
    assert {"val/top1", "train/loss"} <= tags  # the task wrote TensorBoard as Train's controller does
    assert not (run_dir / "checkpoint_manager_snapshot.json").exists()  # no TorchTrainer ran


def test_one_worker_stage_failing_every_attempt_stops_after_max_failures(ray_cluster, tree, tmp_path,
                                                                         monkeypatch):
    fail = {"kind": "raise", "rank": 0, "epoch": 2, "step": 0}
    cfg, run_dir, events = one_worker(tree, tmp_path, monkeypatch, "solo-fails", fail,
                                      extra=["run.max_failures=1"])
    with pytest.raises(RunFailedError, match=r"2 attempt\(s\) failed \(run.max_failures=1\); first error: "
                                             r"rank 0: RuntimeError: chaos: injected failure"):
        run_stage(cfg, "student")
    assert [a["start_epoch"] for a in read_events(events) if a["event"] == "attempt"] == [1, 2]
    assert len(read_failures(run_dir)) == 2
    assert checkpoints.latest(run_dir)[1]["epoch"] == 1  # the finished epoch is kept
    assert [r["epoch"] for r in read_history(run_dir)] == [1]


def test_plugin_method_with_a_trainable_head_trains_saves_and_resumes(tree, tmp_path):
    """A Distiller defined in tests/ (its own distill.params, a head sized in setup()) runs under
    DDP; its head is in every checkpoint and comes back on resume (its step counter goes on). On
    two gloo ranks running the Ray workers' loop (tests/method_ranks.py): the Ray path of a
    method's state is the fitnets test's (tests/test_features_ray.py)."""
    classes = sorted(p.name for p in (tree / "train").iterdir())
    torch.manual_seed(0)
    teacher_path = tmp_path / "teacher.pt"
    export_teacher(teacher_path, build_model("tiny_cnn", len(classes)), "tiny_cnn", classes, 32)
    base = ["distill.loss=tests.plugins:HeadedMSE", "distill.params={weight: 0.7}",
            f"distill.teacher_path={teacher_path}", "distill.teacher_cache=off", "run.name=headed",
            "run.threads_per_worker=1"]
    storage = tmp_path / "results"
    jobs = [make_loop_config(tree_config(tree, tmp_path, f"optim.epochs={epochs}", *base), "distill",
                             str(storage), "headed") for epochs in (2, 3)]
    gloo.spawn_two(method_ranks.run_jobs, tmp_path, jobs, str(tmp_path))
    errors = [json.loads((tmp_path / f"rank{r}-{i}.json").read_text())["error"] for r in (0, 1) for i in (0, 1)]
    assert not any(errors), errors

    def state_at(epoch):
        folder = next(f for f in checkpoints.folders(storage / "headed")
                      if checkpoints.read_manifest(f)["epoch"] == epoch)
        return checkpoints.load(folder)[0]

    first = state_at(2)
    steps_per_epoch = int(first["method"]["steps"]) // 2
    assert steps_per_epoch >= 1 and int(first["method"]["steps"]) == 2 * steps_per_epoch
    assert not torch.equal(first["method"]["head.weight"], torch.eye(len(classes)))  # trained
    assert read_history(storage / "headed")[-1]["train/mse"] > 0  # its parts are logged
    resumed = state_at(3)
    assert resumed["epoch"] == 3
    assert int(resumed["method"]["steps"]) == 3 * steps_per_epoch  # restored, not a fresh head


def test_pipeline_cli_writes_comparison_plot_and_report(ray_cluster, tree, tmp_path):
    args = ["pipeline", "--set", "data.name=imagefolder", "--set", f"data.root={tree}",
            "--set", "data.image_size=32", "--set", "model.teacher=simple_cnn",
            "--set", "model.student=tiny_cnn", "--set", "data.labels_per_class=8",
            "--set", "optim.epochs=2", "--set", f"run.storage={tmp_path}", "--set", "run.name=pipe",
            "--set", "run.num_workers=1"]  # 2 workers: test_two_worker_distillation_...
    out = kd_ray_here(*args)
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
    assert "agreement with teacher" in table and (root / "tradeoff.png").stat().st_size > 10_000
    (root / "comparison.md").unlink()
    from kd_ray.cli import main

    assert main(["report", str(root)]) == 0 and (root / "comparison.md").read_text() == table
