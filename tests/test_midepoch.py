"""Checkpoints inside an epoch (run.checkpoint_every_s), without Ray: the loop runs in-process as a
1-worker trial (cluster.trial.train_in_actor, Tune's report captured), stopped by the chaos
suite's fault hook (kd_ray.testing.faults) at a step of epoch 2, then resumed at that step."""
import json
import math

import pytest
import torch

from kd_ray import cache as teacher_cache
from kd_ray.cluster import trial
from kd_ray.config import load_config
from kd_ray.data.sampling import ShuffleSampler
from kd_ray.engine import checkpoints
from kd_ray.cluster.stage import make_loop_config
from kd_ray.cluster.worker import train_loop
from kd_ray.engine.loop import SAVE, STOP
from kd_ray.engine.resume import MidEpoch, resume_from
from kd_ray.errors import ConfigError
from kd_ray.models import build_model, export_teacher
from kd_ray.runs.files import STOP_FILE, prune_mid_epoch, read_history
from kd_ray.testing.faults import read_events

import gloo
import two_ranks  # spawned ranks import only this and the engine (not Ray)

KEYS = ("train/loss", "val/top1", "val/loss")
STOP_STEP = 3  # epoch 2 stops just before this step: 3 steps done and checkpointed


def cfg_for(tmp_path, *extra):
    return load_config(overrides=[
        "data.name=synthetic", "data.synthetic_size=192", "data.image_size=16", "model.student=tiny_cnn",
        "distill.loss=ce", f"run.storage={tmp_path}", "run.num_workers=1", "optim.batch_size=24",
        "optim.epochs=3", "run.keep_checkpoints=2", *extra])


@pytest.fixture(autouse=True)
def reports(monkeypatch):
    rows = []
    monkeypatch.setattr(trial.tune, "report", rows.append)
    return rows


def interrupted_then_resumed(cfg, tmp_path, name, monkeypatch):
    """Train ``name`` with a checkpoint after every step, stopped before STOP_STEP of epoch 2, rerun."""
    faults = tmp_path / f"faults-{name}"
    plan = {"dir": str(faults), "faults": [{"kind": "raise", "epoch": 2, "step": STOP_STEP, "once": True}]}
    monkeypatch.setenv("KD_RAY_FAULTS", json.dumps(plan))
    cfg = cfg.replace(run={"checkpoint_every_s": 1e-9})  # due at every check: after every step
    run = tmp_path / name
    with pytest.raises(RuntimeError, match="chaos: injected failure"):
        trial.train_in_actor(cfg, str(tmp_path), name)
    newest = checkpoints.latest(run)
    assert newest is not None
    manifest = newest[1]
    assert (manifest["epoch"], manifest["step"]) == (1, STOP_STEP)  # 1 epoch and 3 steps done
    assert [h["epoch"] for h in manifest["history"]] == [1]
    assert [h["epoch"] for h in read_history(run)] == [1]  # no row for a mid-epoch checkpoint
    trial.train_in_actor(cfg, str(tmp_path), name)  # the rerun (or Tune's retry)
    resumed = [e for e in read_events(faults) if e["event"] == "epoch_resume"]
    assert [(e["epoch"], e["step"]) for e in resumed] == [(2, STOP_STEP)]  # at the step, not epoch 1's end
    return run


def assert_same_epochs(run, reference):
    got, want = read_history(run), read_history(reference)
    assert [h["epoch"] for h in got] == [h["epoch"] for h in want] == [1, 2, 3]
    for a, b in zip(got, want):
        for key in KEYS:
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), (a["epoch"], key, a[key], b[key])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]  # each epoch once


@pytest.mark.parametrize("augment", [False, True])  # augmented: the saved RNG state replays the crops
def test_a_run_stopped_mid_epoch_resumes_at_its_step_with_the_same_metrics(tmp_path, monkeypatch, augment):
    cfg = cfg_for(tmp_path, f"data.augment={augment}")
    trial.train_in_actor(cfg, str(tmp_path), "whole")  # uninterrupted, no mid-epoch checkpoints
    run = interrupted_then_resumed(cfg, tmp_path, "cut", monkeypatch)
    assert_same_epochs(run, tmp_path / "whole")
    # Mid-epoch checkpoints are superseded by the epoch's own: none is left at the end.
    assert all("step" not in checkpoints.read_manifest(f) for f in checkpoints.folders(run))


def test_a_resume_with_a_teacher_cache_replays_the_same_views(tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    export_teacher(teacher, build_model("tiny_cnn", 10), "tiny_cnn", [f"class{c}" for c in range(10)], 16)
    cfg = cfg_for(tmp_path, "distill.loss=kd", f"distill.teacher_path={teacher}", "data.augment=true",
                  "distill.cache_views=2")
    cache = tmp_path / "cache"
    teacher_cache.build(cfg, cache)
    cfg = cfg.replace(distill={"teacher_cache": str(cache)})
    trial.train_in_actor(cfg, str(tmp_path), "whole")
    run = interrupted_then_resumed(cfg, tmp_path, "cut", monkeypatch)
    assert_same_epochs(run, tmp_path / "whole")
    assert all(h["perf/teacher_images"] == 0 for h in read_history(run))  # the cache, not the teacher


def test_the_sampler_skips_a_resumed_epochs_first_samples_without_changing_the_rest():
    data = list(range(50))
    whole = ShuffleSampler(data, num_replicas=2, rank=1, seed=3)
    whole.set_epoch(4)
    cut = ShuffleSampler(data, num_replicas=2, rank=1, seed=3)
    cut.set_epoch(4, skip=10)
    assert list(cut) == list(whole)[10:] and len(cut) == len(whole) - 10
    cut.set_epoch(5)  # the next epoch is whole again
    assert len(list(cut)) == len(cut) == 25


def _fake_checkpoint(run, epoch, step=None):
    state = {"model": {}, "epoch": epoch, **({"step": step} if step is not None else {})}
    return checkpoints.save(run, state, [])


def test_prune_keeps_the_newest_mid_epoch_checkpoints_and_never_an_epochs(tmp_path):
    old_epoch = _fake_checkpoint(tmp_path, 1)
    stale = _fake_checkpoint(tmp_path, 1, step=2)  # older than epoch 2's checkpoint: superseded
    epoch = _fake_checkpoint(tmp_path, 2)
    mids = [_fake_checkpoint(tmp_path, 2, step=s) for s in (1, 2, 3)]
    removed = prune_mid_epoch(tmp_path, keep=2)
    assert sorted(removed) == sorted([stale, mids[0]])
    assert set(checkpoints.folders(tmp_path)) == {old_epoch, epoch, mids[1], mids[2]}


@pytest.mark.parametrize("value", [0, -1, "soon", True])
def test_checkpoint_every_s_must_be_a_positive_number(value):
    with pytest.raises(ConfigError, match="run.checkpoint_every_s"):
        load_config(overrides=[f"run.checkpoint_every_s={value}"])
    assert load_config(overrides=["run.checkpoint_every_s=600"]).run.checkpoint_every_s == 600


def test_two_gloo_ranks_save_after_the_same_step_and_resume_to_the_same_sums_and_weights(tmp_path):
    """DDP with 2 real ranks: rank 0's wish rides on the check's all-reduce (every 4 steps), both
    ranks save after the same steps, and the epoch resumed from the last save (each rank's RNG
    restored, rank 0 holding the summed partial sums) ends with the uninterrupted sums and weights."""
    gloo.spawn_two(two_ranks.run_mid_epoch, tmp_path, str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}-mid.json").read_text()) for r in (0, 1))
    assert r0["saves"] == r1["saves"] == [1, 5]  # after the checked steps 0 and 4 (not the last)
    assert r0["step"] == r1["step"] == 5
    for r in (r0, r1):
        for key in ("loss_sum", "images"):
            assert math.isclose(r["again"][key], r["whole"][key], rel_tol=1e-6), (key, r)
        assert torch.allclose(torch.tensor(r["weights_again"][0]), torch.tensor(r["weights"][0]), atol=1e-6)
    assert r0["whole"]["images"] == 64


def test_a_mid_epoch_checkpoint_of_another_layout_continues_at_its_step_with_a_warning(capsys):
    state = {"position": {"step": 9, "sums": {"loss_sum": 3.0, "images": 30}, "layout": [2, 10, 12]},
             "rng": {"cpu": [torch.get_rng_state()] * 2}}
    device = torch.device("cpu")
    same = resume_from(state, 1, 2, [2, 10, 12], device)
    assert same.step == 9 and same.sums == {"loss_sum": 0.0, "images": 0}  # rank 0 holds the sums
    other = resume_from(state, 0, 1, [1, 20, 6], device)  # 1 rank of 20 images: 6 steps an epoch
    assert other.step == 5 and other.sums == {"loss_sum": 3.0, "images": 30}
    other.restore()  # RNG states of 2 ranks for 1: not restored
    out = capsys.readouterr().out
    assert "[2, 10, 12]" in out and "continues at step 5" in out and "other random numbers" in out
    assert resume_from({"epoch": 2}, 0, 1, [1, 20, 6], device) is None  # an epoch's checkpoint


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("grace_s", [0, 60, 120])
def test_a_stop_checkpoints_now_only_when_the_epochs_rest_would_outlast_the_grace(grace_s):
    clock, asked = Clock(), []
    mid = MidEpoch(math.inf, 0, torch.device("cpu"), [1, 8, 100], None, clock=clock,
                   stop=lambda: bool(asked), grace_s=grace_s)
    mid.begin(epoch=1)
    clock.now = 10.0  # 10 steps in 10 s: the other 90 would take 90 s
    assert mid.due(10, 100) == 0  # no stop asked, no clock-based checkpoint (every_s inf)
    asked.append(True)
    assert mid.due(10, 100) == (STOP if grace_s < 90 else 0)
    clock.now = 50.0  # 40 s after the request, step 50: 50 s of steps left
    assert mid.due(50, 100) == (STOP if grace_s < 90 else 0)
    clock.now = 98.0  # step 98 of 100: 2 s left, 88 s after the request
    assert mid.due(98, 100) == (STOP if grace_s < 90 else 0)
    assert MidEpoch(math.inf, 1, torch.device("cpu"), [], None, stop=lambda: True, grace_s=0).due(1, 9) == 0


def test_a_stop_file_on_object_storage_is_polled_once_a_second():
    clock, polls = Clock(), []
    mid = MidEpoch(math.inf, 0, torch.device("cpu"), [], None, clock=clock, stop=lambda: polls.append(1),
                   grace_s=0, poll_s=1.0)
    for step in range(10):
        clock.now = step * 0.25
        mid.due(step, 100)
    assert len(polls) == 3  # at 0, 1.0 and 2.0 s


def test_a_stop_in_epoch_2_checkpoints_at_once_and_the_rerun_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    """What SIGTERM does in a stage (the driver writes the stop file): with run.stop_grace_s 0 every
    rank stops after the step in progress, and the rerun continues there."""
    cfg = cfg_for(tmp_path, "run.stop_grace_s=0")
    trial.train_in_actor(cfg, str(tmp_path), "whole")
    run, faults = tmp_path / "cut", tmp_path / "faults-stop"
    stop_file = run / STOP_FILE
    plan = {"dir": str(faults), "faults": [{"kind": "touch", "path": str(stop_file), "epoch": 2,
                                            "step": STOP_STEP, "once": True}]}
    monkeypatch.setenv("KD_RAY_FAULTS", json.dumps(plan))
    loop_config = {**make_loop_config(cfg, "distill", str(tmp_path), "cut"), "stop_file": True}
    assert train_loop(loop_config, trial.TrialSession(cfg, run)) is None  # a stop, not an error
    manifest = checkpoints.latest(run)[1]
    assert (manifest["epoch"], manifest["step"]) == (1, STOP_STEP + 1)  # the step in progress finished
    assert [h["epoch"] for h in read_history(run)] == [1]
    stop_file.unlink()  # as the next driver does
    assert train_loop(loop_config, trial.TrialSession(cfg, run)) is None
    resumed = [e for e in read_events(faults) if e["event"] == "epoch_resume"]
    assert [(e["epoch"], e["step"]) for e in resumed] == [(2, STOP_STEP + 1)]
    assert_same_epochs(run, tmp_path / "whole")
    assert all("step" not in checkpoints.read_manifest(f) for f in checkpoints.folders(run))


def test_a_drain_notice_writes_one_checkpoint_now_and_training_goes_on():
    notice = []
    mid = MidEpoch(math.inf, 0, torch.device("cpu"), [1, 8, 100], None, preempted=lambda: bool(notice))
    mid.begin(epoch=0)
    assert mid.due(5, 100) == 0
    notice.append("node 1 drains")
    assert mid.due(6, 100) == SAVE  # a checkpoint, not a stop: Ray restarts the group from it
    assert mid.due(7, 100) == 0  # once
