import math

import pytest
import torch

from kd_ray.config import DistillConfig
from kd_ray.errors import ConfigError
from kd_ray.methods import METHODS, build_method, method_class, needs_teacher

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
    method = build_method(DistillConfig(loss=name, temperature=temp, alpha=alpha))
    return method.loss(s, t, torch.tensor(labels))


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
    method = build_method(DistillConfig(loss=name, temperature=3.0, alpha=0.5))
    assert torch.autograd.gradcheck(lambda x: method.loss(x, t, labels)["loss"], (s,))


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
    assert needs_teacher("ce") is False
    assert needs_teacher("kd") is True and needs_teacher("mse_logits") is True
    assert needs_teacher("tests.plugins:my_loss") is True
    assert needs_teacher("tests.plugins:no_teacher_loss") is False


@pytest.mark.parametrize("name", ["kd", "mse_logits"])
def test_teacher_loss_without_teacher(name):
    with pytest.raises(ConfigError, match="needs teacher logits"):
        call(name, torch.tensor(S), None, [0, 1])


def test_teacher_shape_mismatch():
    with pytest.raises(ConfigError, match="differ"):
        call("kd", torch.tensor(S), torch.zeros(2, 4), [0, 1])


def test_plugin_loads_and_runs():
    method = build_method(DistillConfig(loss="tests.plugins:my_loss"))
    out = method.loss(torch.tensor(S), torch.tensor(T), torch.tensor([0, 1]))
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
        method_class(spec)


def test_unknown_name_lists_choices():
    with pytest.raises(ConfigError) as err:
        method_class("kdd")
    for name in ("ce", "kd", "mse_logits"):
        assert name in str(err.value)
    assert METHODS.names() == ["at", "ce", "crd", "ctkd", "dist", "dkd", "fitnets", "kd", "mlkd", "mse_logits", "reviewkd"]


# ----- the Distiller interface ---------------------------------------------------------------

def test_params_are_checked_by_the_method():
    method = build_method(DistillConfig(loss="tests.plugins:HeadedMSE", params={"weight": 1}))
    assert method.params.weight == 1.0 and isinstance(method.params.weight, float)  # int accepted
    with pytest.raises(ConfigError, match=r"unknown distill.params key\(s\) \['wieght'\].*valid keys: weight"):
        build_method(DistillConfig(loss="tests.plugins:HeadedMSE", params={"wieght": 0.5}))
    with pytest.raises(ConfigError, match="distill.params.weight must be float"):
        build_method(DistillConfig(loss="tests.plugins:HeadedMSE", params={"weight": "high"}))
    with pytest.raises(ConfigError, match="weight must be in"):
        build_method(DistillConfig(loss="tests.plugins:HeadedMSE", params={"weight": 2.0}))
    with pytest.raises(ConfigError, match="distill.loss=mse_logits takes no distill.params"):
        build_method(DistillConfig(loss="mse_logits", params={"beta": 1}))
    with pytest.raises(ConfigError, match="teacher must be one of"):
        method_class("tests.plugins:BadTeacherKind")
    # The teacher and baseline stages of the same config train with ce, which takes no params.
    cfg = DistillConfig(loss="tests.plugins:HeadedMSE", params={"weight": 0.3})
    assert build_method(cfg, "ce").params is None and build_method(cfg).params.weight == 0.3


def test_a_trainable_head_is_in_the_step_the_optimizer_and_the_state():
    """TrainStep = student + the method's extras: one module for DDP, the optimizer and checkpoints."""
    from torch.utils.data import DataLoader, TensorDataset

    from kd_ray.engine import train_one_epoch
    from kd_ray.methods import TrainStep

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    method = build_method(DistillConfig(loss="tests.plugins:HeadedMSE", params={"weight": 0.8}))
    method.setup(student, teacher, torch.zeros(1, 4))
    step = TrainStep(student, method)
    assert {n for n, _ in step.named_parameters()} == {"student.weight", "student.bias",
                                                      "method.head.weight", "method.head.bias"}
    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))), batch_size=8)
    sums = train_one_epoch(step, data, torch.optim.SGD(step.parameters(), lr=0.1), epoch=1,
                           device=torch.device("cpu"), teacher=teacher)
    assert sums["teacher_images"] == 32 and set(sums) >= {"loss_sum", "mse_sum", "ce_sum"}
    state = method.state_dict()
    assert int(state["steps"]) == 4 and not torch.equal(state["head.weight"], torch.eye(3))
    fresh = build_method(DistillConfig(loss="tests.plugins:HeadedMSE"))
    fresh.setup(student, teacher, torch.zeros(1, 4))
    fresh.load_state_dict(state)  # what a resumed worker does with checkpoint["method"]
    assert int(fresh.steps) == 4 and torch.equal(fresh.head.weight, method.head.weight)


def test_feature_methods_get_the_named_layers_of_both_models():
    from kd_ray.methods import TrainStep

    student = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    method = build_method(DistillConfig(loss="tests.plugins:FeatureMatch"))
    parts = TrainStep(student, method)(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), 1, teacher=teacher)
    assert parts["loss"].requires_grad and parts["hint"] > 0
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks  # hooks removed again
    bad = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="layer '0' is not in"):
        TrainStep(torch.nn.Linear(4, 3), method)(torch.randn(2, 4), torch.zeros(2, dtype=torch.long), 1,
                                                  teacher=bad)


def test_the_cache_serves_logit_methods_only():
    from kd_ray.cache import serves

    assert serves(method_class("kd")) and serves(method_class("tests.plugins:HeadedMSE"))
    assert not serves(method_class("tests.plugins:FeatureMatch")) and not serves(method_class("ce"))
