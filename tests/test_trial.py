"""A 1-worker sweep trial trained in its own Tune actor (cluster.trial), run here without Ray:
Tune's report is captured. The Ray tests run such trials for real (test_tune_ray, test_tracking,
test_storage_ray)."""
import json

import pytest

from kd_ray.cluster import trial
from kd_ray.config import load_config
from kd_ray.errors import KdRayError
from kd_ray.runs.files import read_failures, read_history
from tests import plugins


def trial_cfg(tmp_path, *extra):
    return load_config(overrides=[
        "data.name=synthetic", "data.synthetic_size=128", "data.image_size=16", "model.student=tiny_cnn",
        "distill.loss=ce", f"run.storage={tmp_path}", "run.num_workers=1", "optim.batch_size=32",
        "optim.epochs=2", "run.keep_checkpoints=1", "sweep.space={optim.lr: [0.05, 0.1]}", *extra])


@pytest.fixture
def reports(monkeypatch):
    rows = []
    monkeypatch.setattr(trial.tune, "report", rows.append)
    return rows


def test_only_one_worker_trials_train_in_their_actor(tmp_path):
    cfg = trial_cfg(tmp_path)
    assert trial.in_actor(cfg)
    assert not trial.in_actor(cfg.replace(run={"num_workers": 2}))
    assert not trial.in_actor(cfg.replace(sweep={"trial_runner": "train"}))
    assert trial.actor_resources(cfg.replace(run={"cpus_per_worker": 3})) == {"CPU": 3}


def test_a_trial_reports_each_epoch_keeps_its_checkpoints_and_resumes(tmp_path, reports):
    cfg = trial_cfg(tmp_path)
    trial.train_in_actor(cfg, str(tmp_path), "t1")
    assert [r["epoch"] for r in reports] == [1, 2]
    for row in reports:  # the sweep's metric first (Tune's live table), the epoch as Tune's step
        assert next(iter(row)) == "val/top1" and row["timesteps_total"] == row["epoch"]
    assert "perf/setup_seconds" in reports[0] and "perf/setup_seconds" not in reports[1]
    run = tmp_path / "t1"
    assert [h["epoch"] for h in read_history(run)] == [1, 2]
    assert len(list(run.glob("checkpoint_*"))) == 1  # run.keep_checkpoints, as Ray Train keeps them

    reports.clear()  # a retried or resumed trial: on from its checkpoint
    trial.train_in_actor(cfg.replace(optim={"epochs": 3}), str(tmp_path), "t1")
    assert [r["epoch"] for r in reports] == [3]
    assert [h["epoch"] for h in read_history(run)] == [1, 2, 3]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]  # each epoch once


def test_an_error_no_retry_fixes_is_raised_again_without_training(tmp_path, reports):
    plugins._calls["n"] = 0
    cfg = trial_cfg(tmp_path, "distill.loss=tests.plugins:nan_in_second_epoch")
    with pytest.raises(KdRayError, match="finite|nan") as first:
        trial.train_in_actor(cfg, str(tmp_path), "t2")
    assert [r["epoch"] for r in reports] == [1]
    with pytest.raises(KdRayError) as again:  # Tune's retry of the trial
        trial.train_in_actor(cfg, str(tmp_path), "t2")
    assert str(again.value) == str(first.value) and len(reports) == 1  # nothing trained
    trial.forget_errors(tmp_path)  # `tune --resume`: the cause may be fixed
    assert not (tmp_path / "t2" / trial.ERROR_FILE).exists()


def test_a_crash_is_recorded_and_left_to_tune_to_retry(tmp_path, reports, monkeypatch):
    def crash(loop_config, session):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(trial, "train_loop", crash)
    (tmp_path / "t3").mkdir()  # tune.run_trial makes it first
    with pytest.raises(RuntimeError, match="worker lost"):
        trial.train_in_actor(trial_cfg(tmp_path), str(tmp_path), "t3")
    assert "worker lost" in json.dumps(read_failures(tmp_path / "t3"))
    assert not (tmp_path / "t3" / trial.ERROR_FILE).exists()  # Tune's retry trains again
