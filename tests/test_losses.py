import math

import pytest
import torch

from kd_ray.config import DistillConfig
from kd_ray.errors import ConfigError
from kd_ray.losses import LOSSES, get_loss

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]


def softmax(row, temp=1.0):
    e = [math.exp(x / temp) for x in row]
    return [x / sum(e) for x in e]


def ce_row(row, label):
    return -math.log(softmax(row)[label])


def kl_row(t_row, s_row, temp):
    p, q = softmax(t_row, temp), softmax(s_row, temp)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def call(name, s, t, labels, temp=4.0, alpha=0.9):
    fn, _ = get_loss(name)
    return fn(s, t, torch.tensor(labels), DistillConfig(temperature=temp, alpha=alpha))


def test_ce_hand_computed_and_ignores_unlabelled():
    s = torch.tensor(S, requires_grad=True)
    out = call("ce", s, None, [2, -1])
    assert out["loss"].item() == pytest.approx(ce_row(S[0], 2), rel=1e-5)
    out = call("ce", s, None, [1, 2])
    expected = (ce_row(S[0], 1) + ce_row(S[1], 2)) / 2
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["ce"].item() == pytest.approx(expected, rel=1e-5)


def test_kd_hand_computed():
    temp, alpha = 2.0, 0.7
    out = call("kd", torch.tensor(S), torch.tensor(T), [1, -1], temp, alpha)
    kd = temp**2 * (kl_row(T[0], S[0], temp) + kl_row(T[1], S[1], temp)) / 2  # over ALL items
    ce = ce_row(S[0], 1)  # labelled item only
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-5)


def test_mse_logits_hand_computed():
    out = call("mse_logits", torch.tensor(S), torch.tensor(T), [0, 2], alpha=0.6)
    mse = sum((a - b) ** 2 for rs, rt in zip(S, T) for a, b in zip(rs, rt)) / 6
    ce = (ce_row(S[0], 0) + ce_row(S[1], 2)) / 2
    assert out["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.6 * mse + 0.4 * ce, rel=1e-5)


@pytest.mark.parametrize("temp", [1.0, 4.0, 20.0])
def test_kd_gradient_formula(temp):
    # d/ds of alpha*T^2*KL(batchmean) = alpha*T*(softmax(s/T) - softmax(t/T)) / B
    alpha = 0.9
    s = torch.tensor(S, requires_grad=True)
    out = call("kd", s, torch.tensor(T), [-1, -1], temp, alpha)
    out["loss"].backward()
    expected = alpha * temp * (torch.softmax(s.detach() / temp, 1) - torch.softmax(torch.tensor(T) / temp, 1)) / 2
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_kd_gradient_scale_independent_of_temperature():
    # Hinton: for large T the T^2 factor keeps the gradient ~ (s - t) / (N B), whatever T.
    grads = []
    for temp in (50.0, 100.0):
        s = torch.tensor(S, requires_grad=True)
        call("kd", s, torch.tensor(T), [-1, -1], temp, 1.0)["loss"].backward()
        grads.append(s.grad)
    assert torch.allclose(grads[0], grads[1], rtol=0.05, atol=1e-3)
    assert grads[0].abs().max() > 0.05


@pytest.mark.parametrize("name", ["kd", "mse_logits", "ce"])
def test_gradcheck_float64(name):
    torch.manual_seed(0)
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64)
    labels = torch.tensor([0, -1, 3, 4])
    fn, _ = get_loss(name)
    cfg = DistillConfig(temperature=3.0, alpha=0.5)
    assert torch.autograd.gradcheck(lambda x: fn(x, t, labels, cfg)["loss"], (s,))


def test_alpha_zero_reduces_kd_to_ce():
    s, t = torch.tensor(S), torch.tensor(T)
    kd = call("kd", s, t, [1, 0], alpha=0.0)["loss"]
    ce = call("ce", s, None, [1, 0])["loss"]
    assert kd.item() == pytest.approx(ce.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["kd", "mse_logits", "ce"])
def test_all_unlabelled_batch(name):
    s = torch.tensor(S, requires_grad=True)
    out = call(name, s, torch.tensor(T), [-1, -1])
    assert out["ce"].item() == 0.0
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()  # still connected: DDP would hang otherwise
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_bf16_logits_computed_in_float32():
    s = torch.tensor(S).bfloat16().requires_grad_()
    out = call("kd", s, torch.tensor(T).bfloat16(), [1, 0])
    assert out["loss"].dtype == torch.float32
    out["loss"].backward()
    assert s.grad.dtype == torch.bfloat16


def test_needs_teacher_flags():
    assert get_loss("ce")[1] is False
    assert get_loss("kd")[1] is True and get_loss("mse_logits")[1] is True
    assert get_loss("tests.plugins:my_loss")[1] is True
    assert get_loss("tests.plugins:no_teacher_loss")[1] is False


@pytest.mark.parametrize("name", ["kd", "mse_logits"])
def test_teacher_loss_without_teacher(name):
    with pytest.raises(ConfigError, match="needs teacher logits"):
        call(name, torch.tensor(S), None, [0, 1])


def test_teacher_shape_mismatch():
    with pytest.raises(ConfigError, match="differ"):
        call("kd", torch.tensor(S), torch.zeros(2, 4), [0, 1])


def test_plugin_loads_and_runs():
    fn, needs = get_loss("tests.plugins:my_loss")
    out = fn(torch.tensor(S), torch.tensor(T), torch.tensor([0, 1]), DistillConfig())
    assert "loss" in out and out["loss"].ndim == 0


@pytest.mark.parametrize("spec,match", [
    ("tests.plugins.my_loss", "unknown loss"),  # no colon: read as a registry name
    ("tests.plugins:", "must look like"),
    (":my_loss", "must look like"),
    ("no_such_pkg.mod:fn", "cannot import"),
    ("tests.plugins:missing", "no attribute"),
    ("tests.plugins:not_callable", "not callable"),
])
def test_bad_plugin_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        get_loss(spec)


def test_unknown_name_lists_choices():
    with pytest.raises(ConfigError) as err:
        get_loss("kdd")
    for name in ("ce", "kd", "mse_logits"):
        assert name in str(err.value)
    assert LOSSES.names() == ["ce", "kd", "mse_logits"]
