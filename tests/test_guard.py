"""The collapse guard, the test split and the verdict's interval: plain PyTorch and Python, no Ray
(a 1-worker trial's loop runs in-process: cluster.trial with Tune's report captured)."""
import math

import numpy as np
import pytest

from kd_ray.cluster import trial
from kd_ray.config import load_config
from kd_ray.data import build_data, describe
from kd_ray.engine import check_collapse
from kd_ray.errors import CollapseError, KdRayError
from kd_ray.runs.files import read_history
from kd_ray.runs.verdict import judge, make_verdict, paired_interval


def small_cfg(tmp_path, *extra):
    return load_config(overrides=[
        "data.name=synthetic", "data.synthetic_size=256", "data.image_size=16", "model.student=tiny_cnn",
        "distill.loss=ce", f"run.storage={tmp_path}", "run.num_workers=1", "optim.batch_size=32",
        "optim.epochs=4", *extra])


@pytest.fixture
def reports(monkeypatch):
    rows = []
    monkeypatch.setattr(trial.tune, "report", rows.append)
    return rows


def epoch(n, share, loss=1.0, label_share=0.1):
    return {"epoch": n, "val/top_share": share, "val/label_share": label_share, "train/loss": loss,
            "val/top1": 0.1}


def test_one_class_for_two_epochs_stops_with_the_fix_named():
    guard, optim = small_cfg("/tmp").guard, small_cfg("/tmp").optim
    check_collapse([epoch(1, 0.97)], guard, method="dkd", optim=optim)  # one epoch is not yet a collapse
    check_collapse([epoch(1, 0.97), epoch(2, 0.5)], guard, method="dkd", optim=optim)
    with pytest.raises(CollapseError) as stopped:
        check_collapse([epoch(1, 0.5), epoch(2, 0.96), epoch(3, 0.99)], guard, method="dkd", optim=optim)
    message = str(stopped.value)
    assert "epochs 2-3" in message and "optim.lr (0.05)" in message and "distill.params.beta" in message
    # A validation split that is itself 97% one class is no collapse.
    check_collapse([epoch(1, 0.97, label_share=0.97), epoch(2, 0.97, label_share=0.97)], guard,
                   method="kd", optim=optim)


def test_the_one_class_rule_waits_for_the_warm_up_and_min_steps():
    cfg = small_cfg("/tmp")
    stuck = [epoch(1, 0.99), epoch(2, 0.99)]
    check_collapse(stuck, cfg.guard, method="kd", optim=cfg.optim)  # epoch 1 is the warm-up
    no_warmup = cfg.replace(optim={"warmup_epochs": 0}).optim
    with pytest.raises(CollapseError, match="epochs 1-2"):
        check_collapse(stuck, cfg.guard, method="kd", optim=no_warmup)
    # A short run on little data: 2 epochs of 10 steps is under guard.min_steps (50).
    check_collapse(stuck, cfg.guard, method="kd", optim=no_warmup, steps_per_epoch=10)
    with pytest.raises(CollapseError):
        check_collapse(stuck, cfg.guard, method="kd", optim=no_warmup, steps_per_epoch=50)


def test_a_loss_far_above_its_first_epoch_stops_and_null_turns_the_checks_off():
    cfg = small_cfg("/tmp")
    rising = [epoch(1, 0.2, 2.0), epoch(2, 0.2, 15.0)]
    check_collapse(rising, cfg.guard, method="kd", optim=cfg.optim)  # 7.5x < 10x
    with pytest.raises(CollapseError, match="diverged.*epoch 3.*set optim.clip_grad_norm"):
        check_collapse(rising + [epoch(3, 0.2, 25.0)], cfg.guard, method="kd",
                       optim=cfg.replace(optim={"clip_grad_norm": None}).optim)
    off = cfg.replace(guard={"loss_growth": None, "collapse_share": None}).guard
    check_collapse(rising + [epoch(3, 1.0, 1e9), epoch(4, 1.0, 1e9)], off, method="kd", optim=cfg.optim)


def test_a_planted_collapse_stops_within_two_epochs_and_keeps_its_checkpoints(tmp_path, reports):
    # lr 50 from the first step, on enough data (64 steps an epoch) for the one-class rule.
    cfg = small_cfg(tmp_path, "optim.lr=50", "optim.warmup_epochs=0", "data.synthetic_size=2048")
    with pytest.raises(KdRayError, match="optim.lr") as stopped:
        trial.train_in_actor(cfg, str(tmp_path), "planted")
    assert isinstance(stopped.value, CollapseError) or "non-finite" in str(stopped.value)
    assert len(str(stopped.value).splitlines()) == 1
    history = read_history(tmp_path / "planted")
    assert 1 <= len(history) <= 2 and len(reports) <= 2
    assert list((tmp_path / "planted").glob("checkpoint_*"))  # the epochs it trained are kept


def test_the_held_out_test_split_is_stratified_and_leaves_the_label_budget_alone(tmp_path):
    cfg = small_cfg(tmp_path, "data.test_fraction=0.25", "data.labels_per_class=4").data
    info = describe(cfg)
    assert (info.train_count, info.test_count) == (192, 64)
    bundle = build_data(cfg, "distill", seed=0)
    train_ids, test_ids = set(bundle.train.indices.tolist()), set(bundle.test.indices.tolist())
    assert not train_ids & test_ids and len(train_ids | test_ids) == 256
    assert set(np.bincount(bundle.test.labels, minlength=10).tolist()) == {6, 7}  # 25-26 per class
    labelled = bundle.train.indices[bundle.train.labels >= 0]
    assert len(labelled) == 40 and not set(labelled.tolist()) & test_ids  # 4 per class, none tested
    assert describe(small_cfg(tmp_path).data).test_count == 0  # none unless asked


def test_training_never_reads_the_test_split_and_reads_it_once_at_the_end(tmp_path, reports, monkeypatch):
    from kd_ray.cluster import worker
    from kd_ray.data.datasets import View

    reads = {"train": set(), "test": []}
    real_build, real_get = worker.build_data, View.__getitem__

    def tagged(*args, **kwargs):  # the worker's bundle, its views tagged by role
        bundle = real_build(*args, **kwargs)
        bundle.train.role, bundle.test.role = "train", "test"
        return bundle

    def recording(self, k):
        role = getattr(self, "role", None)
        if role == "train":
            reads["train"].add(int(self.indices[k]))
        elif role == "test":
            reads["test"].append(int(self.indices[k]))
        return real_get(self, k)

    monkeypatch.setattr(worker, "build_data", tagged)
    monkeypatch.setattr(View, "__getitem__", recording)
    cfg = small_cfg(tmp_path, "data.test_fraction=0.25", "optim.epochs=3")
    trial.train_in_actor(cfg, str(tmp_path), "t")
    held_out = set(real_build(cfg.data, "student", 0).test.indices.tolist())
    assert len(reads["train"]) == 192 and not reads["train"] & held_out
    assert sorted(reads["test"]) == sorted(held_out)  # every test image once, in all
    assert ["test/top1" in r for r in reports] == [False, False, True]  # after the last epoch only


def test_the_verdict_interval_is_the_paired_t_interval_computed_by_hand():
    base, distilled = [80.0, 82.0, 81.0], [90.0, 91.0, 93.0]
    diffs = [10.0, 9.0, 12.0]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, df=2) from the tables
    v = make_verdict(base, distilled, margin=1.0)
    assert (v.diff_mean, v.low, v.high) == pytest.approx((mean, mean - half, mean + half))
    assert v.verdict == "helps"
    assert paired_interval([1.0])[1:] == (-math.inf, math.inf)
    assert judge(-3.0, -0.5, 1.0) == "worse"
    assert judge(-0.4, 0.6, 1.0) == "no better"
    assert judge(-2.0, 3.0, 1.0) == "inconclusive: run more seeds"
    assert make_verdict([50.0, 60.0], [61.0, 49.0]).verdict.startswith("inconclusive")
