"""A feature method on Ray: `fitnets` on 2 workers (live teacher, a trainable regressor in DDP with
the student), its driver SIGKILLed in epoch 3, the same command again: the run resumes from
epoch 3 with the regressor of the epoch-2 checkpoint on every rank, not a fresh one."""
import os

import pytest
import torch

import chaos_scenarios as chaos
from kd_ray.engine import checkpoints
from kd_ray.runs.files import read_history
from kd_ray.testing.faults import read_events, state_digest

pytestmark = pytest.mark.ray


def test_fitnets_on_two_workers_resumes_with_its_regressor(ray_cluster, tmp_path):
    env = dict(os.environ, **chaos.RAY_ENV, RAY_ADDRESS=ray_cluster, PYTHONUNBUFFERED="1")
    teacher = chaos.make_teacher(tmp_path / "teacher.pt", [f"class{i}" for i in range(10)])
    argv = ["distill", *chaos.settings(tmp_path, "fit", "optim.epochs=3", f"distill.teacher_path={teacher}",
                                       "distill.loss=fitnets", "distill.params.student_layer=4",
                                       "distill.params.teacher_layer=4", "distill.params.weight=5",
                                       "distill.teacher_cache=auto")]
    faults_dir, run_dir = tmp_path / "faults", tmp_path / "fit"
    chaos.kill_driver_after_epoch_2(argv, env, run_dir, faults_dir)
    assert len(read_history(run_dir)) == 2, "the first run did not reach epoch 2"

    out = chaos.kd_ray(argv, env, faults_dir, chaos.HOLD_EPOCH_3, inline=True)  # the same command again
    assert out.code == 0, out.err
    assert "[kd_ray] resuming fit from epoch 3 " in out.out
    assert out.out.count("reads teacher features: the teacher runs live") == 1  # said once, no cache
    assert chaos.logged_epochs(run_dir) == [1, 2, 3]
    assert not (tmp_path / "teacher_cache").exists()

    saved = next(f for f in checkpoints.folders(run_dir) if checkpoints.read_manifest(f)["epoch"] == 2)
    state = torch.load(saved / checkpoints.STATE_FILE, map_location="cpu", weights_only=False)
    assert set(state["method"]) == {"regressor.0.weight", "regressor.0.bias", "regressor.1.weight", "regressor.1.bias",
                                    "regressor.1.running_mean", "regressor.1.running_var",
                                    "regressor.1.num_batches_tracked"}  # ConvReg: 1x1 conv, BN, ReLU
    assert tuple(state["method"]["regressor.0.weight"].shape) == (16, 16, 1, 1)
    attempts = [e for e in read_events(faults_dir) if e["event"] == "attempt"]
    fresh = [e["method_state"] for e in attempts if e["start_epoch"] == 1]
    resumed = [e["method_state"] for e in attempts if e["start_epoch"] == 3]
    assert len(fresh) == 2 and len(resumed) == 2  # both ranks, each attempt
    assert all(digest == state_digest(state["method"]) for digest in resumed)  # restored on every rank
    assert all(digest != resumed[0] for digest in fresh)  # and it had trained: not the initial weights
    history = read_history(run_dir)
    assert all(row["train/hint"] > 0 for row in history)  # the hint loss is logged every epoch
