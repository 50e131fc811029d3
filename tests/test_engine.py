"""train_one_epoch / evaluate / build_optimizer on tiny models, no Ray."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from kd_ray.config import OptimConfig
from kd_ray.engine import build_optimizer, epoch_metrics, evaluate, train_one_epoch
from kd_ray.errors import NonFiniteLossError
from kd_ray.methods import TrainStep, loss_method

CPU = torch.device("cpu")


def ce_loss(s, t, labels, cfg):
    return {"loss": F.cross_entropy(s, labels), "ce": F.cross_entropy(s, labels)}


def blobs(n=64, classes=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(n) % classes
    return TensorDataset(centers[labels] + torch.randn(n, dim, generator=g) * 0.5, labels)


def step(model, loss):
    return TrainStep(model, loss_method(loss))


def make_model(dim=8, classes=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(dim, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes))


def test_training_lowers_loss_and_counts_images():
    data = DataLoader(blobs(), batch_size=16, shuffle=True)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = train_one_epoch(step(model, ce_loss), data, opt, epoch=1, device=CPU)
    for epoch in range(2, 6):
        last = train_one_epoch(step(model, ce_loss), data, opt, epoch=epoch, device=CPU)
    assert first["images"] == last["images"] == 64
    assert last["loss_sum"] / 64 < 0.5 * first["loss_sum"] / 64
    assert set(last) >= {"loss_sum", "ce_sum", "images", "seconds"}


def test_evaluate_counts_exactly():
    model = make_model(dim=2, classes=6)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model[2].bias.copy_(torch.tensor([5.0, 4, 3, 2, 1, 0]))  # always ranks classes 0..5
    labels = torch.tensor([0, 0, 1, 4, 5, 5, 2])
    data = DataLoader(TensorDataset(torch.zeros(7, 2), labels), batch_size=3)
    out = evaluate(model, data, device=CPU)
    assert out["count"] == 7 and out["correct1"] == 2 and out["correct5"] == 5
    logits = torch.tensor([5.0, 4, 3, 2, 1, 0]).expand(7, 6)
    assert out["loss_sum"] == pytest.approx(F.cross_entropy(logits, labels, reduction="sum").item(), rel=1e-5)


def test_teacher_stays_frozen_and_in_eval_mode():
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 3), torch.nn.Dropout(0.5))
    before = [p.clone() for p in teacher.parameters()]
    seen = []

    def kd(s, t, labels, cfg):
        seen.append((teacher.training, t.requires_grad))
        return {"loss": F.mse_loss(s, t)}

    teacher.train()  # the engine must switch it to eval
    model = make_model()
    train_one_epoch(step(model, kd), DataLoader(blobs(), batch_size=16), torch.optim.SGD(model.parameters(), lr=0.1),
                    epoch=1, device=CPU, teacher=teacher)
    assert seen and all(mode == (False, False) for mode in seen)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


@pytest.mark.parametrize("check_every, steps_run", [(1, 3), (2, 4), (100, 4)])
def test_non_finite_loss_names_epoch_and_step(check_every, steps_run):
    """The first bad step is named also when the check runs only every few steps (GPU)."""
    calls = {"n": 0}

    def bad(s, t, labels, cfg):
        calls["n"] += 1
        value = F.cross_entropy(s, labels)
        return {"loss": value * math.nan if calls["n"] in (3, 4) else value}

    model = make_model()
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss \(nan\) at epoch 4 step 2:"):
        train_one_epoch(step(model, bad), DataLoader(blobs(), batch_size=16),
                        torch.optim.SGD(model.parameters(), lr=0.1), epoch=4, device=CPU,
                        check_every=check_every)
    assert calls["n"] == steps_run  # the loop stops at the first check after the bad step


def test_channels_last_gives_the_same_sums():
    from kd_ray.models.zoo import tiny_cnn

    images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(images, torch.arange(32) % 3), batch_size=16)
    runs = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = tiny_cnn(3).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train = train_one_epoch(step(model, ce_loss), data, opt, epoch=1, device=CPU, channels_last=channels_last)
        runs.append((train["loss_sum"], evaluate(model, data, device=CPU, channels_last=channels_last)))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-4)
    assert runs[0][1]["correct1"] == runs[1][1]["correct1"]


def test_epoch_metrics_from_summed_counters():
    train = {"loss_sum": 30.0, "kd_sum": 10.0, "images": 60, "seconds": 2.0}
    val = {"loss_sum": 5.0, "correct1": 7, "correct5": 9, "count": 10}
    m = epoch_metrics(train, val, num_classes=10)
    assert m["train/loss"] == 0.5 and m["train/kd"] == pytest.approx(1 / 6)
    assert m["val/top1"] == 0.7 and m["val/top5"] == 0.9 and m["val/loss"] == 0.5
    assert m["perf/images_per_s"] == 30.0
    assert "val/top5" not in epoch_metrics(train, val, num_classes=3)


@pytest.mark.parametrize("schedule", ["cosine", "step", "none"])
def test_schedules_with_warmup(schedule):
    cfg = OptimConfig(lr=1.0, schedule=schedule, warmup_epochs=1, step_size=1, gamma=0.5, epochs=3)
    model = make_model()
    opt, sched = build_optimizer(model, cfg, steps_per_epoch=10, epochs=3)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01)  # warm-up starts low
    assert lrs[10] == pytest.approx(1.0)  # and reaches the base rate after one epoch
    if schedule == "cosine":
        assert lrs[-1] < 0.05
    elif schedule == "step":
        assert lrs[-1] == pytest.approx(0.5)  # one decay: steps count after warm-up
    else:
        assert lrs[-1] == pytest.approx(1.0)


def test_adamw_chosen_by_name():
    opt, _ = build_optimizer(make_model(), OptimConfig(name="adamw", lr=1e-3), 5, 2)
    assert isinstance(opt, torch.optim.AdamW)


def test_clip_grad_norm_bounds_each_update():
    """With plain SGD (lr 1, no momentum) an update is the gradient: its norm is at most the clip."""
    def huge(s, t, labels, cfg):
        return {"loss": 1000 * F.cross_entropy(s, labels)}

    data = DataLoader(blobs(n=16), batch_size=16)
    moved = {}
    for clip in (None, 0.5):
        model = make_model()
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train_one_epoch(step(model, huge), data, torch.optim.SGD(model.parameters(), lr=1.0), epoch=1,
                        device=CPU, clip_grad_norm=clip)
        moved[clip] = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm())
    assert moved[0.5] == pytest.approx(0.5, rel=1e-4) and moved[None] > 10
    with pytest.raises(Exception, match="clip_grad_norm must be > 0"):
        OptimConfig(clip_grad_norm=0.0)
