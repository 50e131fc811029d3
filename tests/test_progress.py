"""Progress inside an epoch (engine.progress.StepProgress) on a fake clock, and through
train_one_epoch."""
import logging

import pytest
import torch

from kd_ray.config import load_config
from kd_ray.engine import StepProgress, train_one_epoch
from kd_ray.errors import ConfigError
from kd_ray.methods import TrainStep, build_method


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lines_every_interval_with_images_rate_and_eta(caplog):
    clock, points = Clock(), []
    hook = StepProgress("run", epoch=2, epochs=3, steps=100, batch=8, world=2, interval=30,
                        every=10, scalar=lambda tag, v, s: points.append((tag, v, s)), clock=clock)
    with caplog.at_level(logging.INFO, logger="kd_ray"):
        for step in range(100):
            clock.now = 0.5 * (step + 1)  # 32 images/s over both ranks
            hook(step, 8 * (step + 1), torch.tensor(1.0 / (step + 1)))
    lines = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    assert len(lines) == 1 and hook.lines == 1  # at 30 s of a 50 s epoch; none after the last step
    assert lines[0].startswith("run epoch 2/3 | 960/1,600 images (60%) | 32 img/s")
    assert lines[0].endswith("ETA 0:20")
    assert [s for _, _, s in points] == list(range(100, 200, 10))  # global steps of epoch 2
    assert points[1] == ("train_step/loss", pytest.approx(1 / 11), 110)


def test_train_one_epoch_calls_the_hook_every_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    step = TrainStep(model, build_method(load_config().distill, "ce"))
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(4)]
    seen = []
    train_one_epoch(step, data, torch.optim.SGD(model.parameters(), lr=0.1), epoch=1,
                    device=torch.device("cpu"), on_step=lambda s, n, loss: seen.append((s, n, float(loss))))
    assert [(s, n) for s, n, _ in seen] == [(0, 5), (1, 10), (2, 15), (3, 20)]
    assert all(loss > 0 for *_, loss in seen)


def test_interval_must_be_positive():
    with pytest.raises(ConfigError, match="progress_interval_s"):
        load_config(overrides=["run.progress_interval_s=0"])
