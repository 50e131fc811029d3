"""Logit methods (kd with standardize, dkd, dist) on fixed tensors, against independent references:
torchdistill's losses (a pinned dev dependency) for KD, logit-standardised KD and DIST; the DKD
paper's equations computed by hand for DKD."""
import math

import pytest
import torch
from torchdistill.losses.mid_level import DISTLoss, KDLoss, LogitStdKDLoss

from kd_ray.config import DistillConfig
from kd_ray.errors import ConfigError
from kd_ray.methods import METHODS, build_method

S = [[1.0, 2.0, 0.5, -0.3], [0.0, -1.0, 3.0, 0.2], [0.7, 0.1, -0.4, 1.9]]
T = [[2.0, 0.0, 1.0, 0.1], [1.0, 0.5, 2.5, 0.4], [-0.5, 0.3, 2.2, 1.0]]


def method(name, temp=4.0, kd_alpha=0.9, **params):
    """The method with distill.temperature, distill.alpha and distill.params."""
    return build_method(DistillConfig(loss=name, temperature=temp, alpha=kd_alpha, params=params))


def io(logits):
    return {".": {"output": logits}}  # torchdistill's io dict: module path -> io -> tensor


# ----- kd and logit standardisation, against torchdistill ----------------------------------------

@pytest.mark.parametrize("temp, alpha", [(1.0, 0.5), (4.0, 0.9), (8.0, 0.3)])
def test_kd_equals_torchdistill(temp, alpha):
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor([1, 2, 3])
    ours = method("kd", temp, alpha).loss(s, t, y)["loss"]
    # torchdistill's alpha weighs CE: theirs = alpha' * CE + (1 - alpha') * T^2 * KL.
    ref = KDLoss(".", "output", ".", "output", temperature=temp, alpha=1 - alpha)(io(s), io(t), y)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_standardized_kd_equals_torchdistill(temp):
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor([0, 3, 1])
    ours = method("kd", temp, 0.6, standardize=True).loss(s, t, y)
    ref = LogitStdKDLoss(".", "output", ".", "output", temperature=temp, alpha=0.4)(io(s), io(t), y)
    assert ours["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    plain = method("kd", temp, 0.6).loss(s, t, y)
    assert ours["kd"].item() != pytest.approx(plain["kd"].item(), rel=1e-3)  # it did change something


def test_standardization_ignores_the_scale_and_shift_of_logits():
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor([-1, -1, -1])
    m = method("kd", 2.0, 1.0, standardize=True)
    a = m.loss(s, t, y)["kd"]
    b = m.loss(s, 5 * t + 3, y)["kd"]  # a hotter, shifted teacher: same standardised logits
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_torchdistill_kd_gives_nan_without_labels_and_ours_does_not():
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor([-1, -1, -1])
    ref = KDLoss(".", "output", ".", "output", temperature=4.0, alpha=0.1, ignore_index=-1)(io(s), io(t), y)
    assert math.isnan(ref.item())
    ours = method("kd").loss(s, t, y)
    assert torch.isfinite(ours["loss"]) and ours["ce"].item() == 0.0


# ----- DIST, against torchdistill -------------------------------------------------------------------

@pytest.mark.parametrize("temp, beta, gamma", [(1.0, 1.0, 1.0), (4.0, 2.0, 0.5)])
def test_dist_equals_torchdistill(temp, beta, gamma):
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor([0, -1, 2])
    ours = method("dist", temp, beta=beta, gamma=gamma, ce_weight=0.0).loss(s, t, y)
    ref = DISTLoss(".", "output", ".", "output", beta=beta, gamma=gamma, tau=temp)(io(s), io(t))
    assert ours["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    with_ce = method("dist", temp, beta=beta, gamma=gamma).loss(s, t, y)
    assert with_ce["loss"].item() == pytest.approx(ref.item() + with_ce["ce"].item(), rel=1e-5)


def test_dist_is_zero_for_a_perfect_student():
    t = torch.tensor(T)
    out = method("dist", 1.0).loss(t.clone(), t, torch.tensor([-1, -1, -1]))
    assert out["inter"].item() == pytest.approx(0, abs=1e-4) and out["intra"].item() == pytest.approx(0, abs=1e-4)


# ----- DKD, against the paper's equations by hand -------------------------------------------------

def softmax(row, temp):
    e = [math.exp(x / temp) for x in row]
    return [x / sum(e) for x in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def dkd_by_hand(s_row, t_row, target, temp):
    """Zhao et al. (CVPR 2022), Eq. 1-3: b = [p_target, 1 - p_target], p_hat = the softmax over
    the non-target classes; TCKD = KL(b_t || b_s), NCKD = KL(p_hat_t || p_hat_s); both x T^2."""
    p_s, p_t = softmax(s_row, temp), softmax(t_row, temp)
    b_s, b_t = [p_s[target], 1 - p_s[target]], [p_t[target], 1 - p_t[target]]
    rest = [j for j in range(len(s_row)) if j != target]
    hat_s = softmax([s_row[j] for j in rest], temp)
    hat_t = softmax([t_row[j] for j in rest], temp)
    return kl(b_t, b_s) * temp**2, kl(hat_t, hat_s) * temp**2, p_t[target]


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dkd_equals_the_paper_by_hand(temp):
    labels = [1, -1, 3]  # the unlabelled item takes the teacher's argmax (class 2) as its target
    targets = [1, max(range(4), key=lambda j: T[1][j]), 3]
    assert targets[1] == 2
    terms = [dkd_by_hand(S[i], T[i], targets[i], temp) for i in range(3)]
    tckd = sum(a for a, _, _ in terms) / 3
    nckd = sum(b for _, b, _ in terms) / 3
    ce = sum(-math.log(softmax(S[i], 1.0)[labels[i]]) for i in (0, 2)) / 2
    alpha, beta = 0.7, 5.0
    out = method("dkd", temp, alpha=alpha, beta=beta, warmup=0).loss(torch.tensor(S), torch.tensor(T),
                                                                     torch.tensor(labels), epoch=1)
    assert out["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert out["nckd"].item() == pytest.approx(nckd, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce + alpha * tckd + beta * nckd, rel=1e-5)


@pytest.mark.parametrize("row", range(3))
def test_kd_decomposes_into_tckd_and_nckd(row):
    # The paper's Eq. 5: KD = TCKD + (1 - p_target^T) * NCKD, item by item: ties kd to dkd.
    s, t, temp = torch.tensor([S[row]]), torch.tensor([T[row]]), 2.0
    y = torch.tensor([row])
    kd = method("kd", temp, 1.0).loss(s, t, y)["kd"].item()
    out = method("dkd", temp, warmup=0).loss(s, t, y)
    p_target = torch.softmax(t / temp, 1)[0, row].item()
    assert kd == pytest.approx(out["tckd"].item() + (1 - p_target) * out["nckd"].item(), rel=1e-5)


def test_dkd_warms_up_linearly_then_stays():
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor([0, 1, 2])
    m = method("dkd", alpha=1.0, beta=8.0, warmup=4)
    full = m.loss(s, t, y, epoch=4)
    dkd = full["tckd"].item() + 8.0 * full["nckd"].item()
    for epoch, weight in [(1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)]:
        out = m.loss(s, t, y, epoch=epoch)
        assert out["loss"].item() == pytest.approx(out["ce"].item() + weight * dkd, rel=1e-5)


def test_dkd_standardize_changes_the_soft_terms_only():
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor([0, 1, 2])
    plain, std = method("dkd", 2.0, warmup=0).loss(s, t, y), method("dkd", 2.0, warmup=0, standardize=True).loss(s, t, y)
    assert plain["ce"].item() == pytest.approx(std["ce"].item())
    assert plain["nckd"].item() != pytest.approx(std["nckd"].item(), rel=1e-3)


# ----- every logit method: finite without labels, gradients, params -----------------------------

LOGIT_METHODS = ["kd", "mse_logits", "dkd", "dist"]


@pytest.mark.parametrize("name", LOGIT_METHODS)
@pytest.mark.parametrize("params", [{}, {"standardize": True}])
@pytest.mark.parametrize("batch", [1, 3])
def test_no_nan_on_a_batch_without_labels(name, params, batch):
    if params and name not in ("kd", "dkd"):  # only kd and dkd take `standardize`: refused in one line
        with pytest.raises(ConfigError, match=r"\['standardize'\]"):
            method(name, **params)
        return
    s = torch.tensor(S[:batch], requires_grad=True)
    out = method(name, **params).loss(s, torch.tensor(T[:batch]), torch.full((batch,), -1), epoch=1)
    assert all(torch.isfinite(v).all() for v in out.values()) and out["ce"].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name, params", [("dkd", {"warmup": 0}), ("dkd", {"standardize": True}), ("dist", {})])
def test_gradcheck_float64(name, params):
    torch.manual_seed(0)
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64)
    m = method(name, 3.0, **params)
    assert torch.autograd.gradcheck(lambda x: m.loss(x, t, torch.tensor([0, -1, 3, 4]), epoch=2)["loss"], (s,))


def test_dkd_and_dist_compute_bf16_in_float32():
    for name in ("dkd", "dist"):
        s = torch.tensor(S).bfloat16().requires_grad_()
        out = method(name).loss(s, torch.tensor(T).bfloat16(), torch.tensor([1, 0, -1]))
        assert out["loss"].dtype == torch.float32
        out["loss"].backward()
        assert s.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("name, params, match", [
    ("dkd", {"gamma": 1}, r"unknown distill.params key\(s\) \['gamma'\] for distill.loss=dkd; valid keys: "
                          "alpha, beta, ce_weight, standardize, warmup"),
    ("dist", {"tau": 1}, "valid keys: beta, ce_weight, gamma"),
    ("kd", {"beta": 1}, "valid keys: standardize"),
    ("dkd", {"beta": -1}, "beta must be >= 0"),
    ("dkd", {"warmup": 1.5}, "distill.params.warmup must be int"),
    ("kd", {"standardize": "yes"}, "distill.params.standardize must be bool"),
    ("mse_logits", {"standardize": True}, r"mse_logits takes no distill.params, got \['standardize'\]"),
])
def test_bad_params_name_the_valid_ones(name, params, match):
    with pytest.raises(ConfigError, match=match):
        method(name, **params)


def test_the_registry_has_every_method_and_the_cache_serves_the_logit_ones():
    from kd_ray.cache import serves
    from kd_ray.methods import method_class

    assert set(METHODS.names()) >= {"ce", "kd", "mse_logits", "dkd", "dist", "fitnets", "at", "crd", "reviewkd"}
    assert all(serves(method_class(n)) for n in LOGIT_METHODS)
    assert not any(serves(method_class(n)) for n in ("fitnets", "at", "crd", "reviewkd"))
