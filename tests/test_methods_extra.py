"""ctkd and mlkd on fixed tensors against the papers' equations written out by hand."""
import math

import pytest
import torch

from kd_ray.config import DistillConfig
from kd_ray.errors import ConfigError
from kd_ray.methods import TrainStep, build_method
from kd_ray.methods.logits_extra import cosine_lambda

g = torch.Generator().manual_seed(0)
S = torch.randn(6, 5, generator=g) * 2
T = torch.randn(6, 5, generator=g) * 3
Y = torch.tensor([0, 1, -1, 3, -1, 4])


def method(name, temp=4.0, alpha=0.9, **params):
    return build_method(DistillConfig(loss=name, temperature=temp, alpha=alpha, params=params))


def kl_by_hand(s, t, temp):
    """T^2 * mean_i sum_c p_t log(p_t / p_s), softmaxes written out."""
    p_t = torch.exp(t / temp) / torch.exp(t / temp).sum(1, keepdim=True)
    p_s = torch.exp(s / temp) / torch.exp(s / temp).sum(1, keepdim=True)
    return (p_t * (p_t.log() - p_s.log())).sum(1).mean() * temp ** 2


def ce_by_hand(s, y):
    keep = y >= 0
    return -(torch.log_softmax(s[keep], 1)[torch.arange(int(keep.sum())), y[keep]]).mean()


def test_cosine_curriculum_of_the_reversal_strength():
    assert cosine_lambda(0, 10, 0.0, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lambda(5, 10, 0.0, 1.0) == pytest.approx(0.5)
    assert cosine_lambda(10, 10, 0.0, 1.0) == pytest.approx(1.0)
    assert cosine_lambda(30, 10, 0.0, 1.0) == pytest.approx(1.0)  # held after the loops
    assert cosine_lambda(3, 10, 0.2, 0.8) == pytest.approx(0.2 + 0.3 * (1 + math.cos(1.3 * math.pi)))


def test_ctkd_loss_is_kd_at_the_learnt_temperature():
    m = method("ctkd", temp=4.0, alpha=0.9, t_min=1.0, t_range=20.0)
    parts = m.loss(S, T, Y, epoch=5)
    assert parts["temperature"].item() == pytest.approx(4.0, rel=1e-5)  # starts at distill.temperature
    expected = 0.9 * kl_by_hand(S, T, 4.0) + 0.1 * ce_by_hand(S, Y)
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["lambda"].item() == pytest.approx(0.5)


def test_ctkd_temperature_gradient_is_reversed_and_scaled_by_lambda():
    m = method("ctkd", temp=4.0, alpha=0.9, t_min=1.0, t_range=20.0, loops=10)
    s = S.clone().requires_grad_(True)
    m.loss(s, T, Y, epoch=5)["loss"].backward()  # lambda 0.5
    theta = m.theta.detach().clone().requires_grad_(True)
    temp = 1.0 + 20.0 * torch.sigmoid(theta)
    (0.9 * kl_by_hand(S, T, temp) + 0.1 * ce_by_hand(S, Y)).backward()
    assert theta.grad.item() != 0
    assert m.theta.grad.item() == pytest.approx(-0.5 * theta.grad.item(), rel=1e-4)
    # the student's gradient is not reversed
    s_ref = S.clone().requires_grad_(True)
    (0.9 * kl_by_hand(s_ref, T, 4.0) + 0.1 * ce_by_hand(s_ref, Y)).backward()
    assert torch.allclose(s.grad, s_ref.grad, rtol=1e-4, atol=1e-7)


def test_ctkd_temperature_is_a_trainable_extra_in_the_state():
    m = method("ctkd")
    step = TrainStep(torch.nn.Linear(3, 5), m)
    assert "method.theta" in {n for n, _ in step.named_parameters()}
    assert set(m.state_dict()) == {"theta"}
    with torch.no_grad():
        m.theta.fill_(2.0)
    fresh = method("ctkd")
    fresh.load_state_dict(m.state_dict())
    assert fresh.loss(S, T, Y, 1)["temperature"].item() == pytest.approx(1 + 20 / (1 + math.exp(-2.0)), rel=1e-6)


def test_mlkd_sums_instance_batch_and_class_alignment_over_temperatures():
    m = method("mlkd", temperatures=[2, 4], kd_weight=0.5, ce_weight=2.0)
    parts = m.loss(S, T, Y, 1)
    inst = bat = cls = 0.0
    for temp in (2.0, 4.0):
        p_s, p_t = torch.softmax(S / temp, 1), torch.softmax(T / temp, 1)
        inst += kl_by_hand(S, T, temp).item()
        gram_s = torch.einsum("ic,jc->ij", p_s, p_s)  # B x B: item-to-item similarity
        gram_t = torch.einsum("ic,jc->ij", p_t, p_t)
        bat += ((gram_t - gram_s) ** 2).sum().item() / 6
        corr_s = torch.einsum("ic,id->cd", p_s, p_s)  # C x C: class-to-class correlation
        corr_t = torch.einsum("ic,id->cd", p_t, p_t)
        cls += ((corr_t - corr_s) ** 2).sum().item() / 5
    assert parts["instance"].item() == pytest.approx(inst, rel=1e-5)
    assert parts["batch"].item() == pytest.approx(bat, rel=1e-5)
    assert parts["class"].item() == pytest.approx(cls, rel=1e-5)
    expected = 2.0 * ce_by_hand(S, Y).item() + 0.5 * (inst + bat + cls)
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_mlkd_is_zero_when_the_student_matches_and_nothing_is_labelled():
    parts = method("mlkd").loss(T, T, torch.full((6,), -1), 1)
    assert parts["loss"].item() == pytest.approx(0.0, abs=1e-5)


def test_params_are_checked():
    with pytest.raises(ConfigError, match="temperatures must be a list"):
        method("mlkd", temperatures=[2, -1])
    with pytest.raises(ConfigError, match="t_min must be > 0"):
        method("ctkd", t_min=0)
