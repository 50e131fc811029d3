"""crd on fixed tensors: the NCE loss by hand from the paper's equations, scores, Z and the banks
against torchdistill's CRDLoss (a port of the authors' code), the momentum update by hand, the
banks' update shared across ranks (by hand, in one process group of 1, and on two spawned gloo
ranks), the state round trip, and setup's one-line errors."""
import datetime
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdistill.losses.mid_level import CRDLoss

import gloo
import crd_ranks  # spawned ranks import only this (not Ray)
from kd_ray.config import DistillConfig
from kd_ray.data.views import Indexed
from kd_ray.engine import train_one_epoch
from kd_ray.errors import ConfigError
from kd_ray.methods import Outputs, TrainStep, build_method, setup_method
from kd_ray.methods.crd import gather_rows, nce_loss, scores, update_bank
from kd_ray.methods.logits import hinton_kd


def net(width):
    """conv -> relu -> pool '3' (width x 1 x 1) -> flatten '4' (width) -> linear '5' (5 classes)."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))


@pytest.fixture
def models():
    torch.manual_seed(0)
    return net(4), net(8).eval().requires_grad_(False)


def crd(student, teacher, train_size=10, **params):
    params = {"student_layer": "4", "teacher_layer": "3", "feat_dim": 6, "nce_k": 5, **params}
    m = build_method(DistillConfig(loss="crd", temperature=4.0, alpha=0.9, params=params))
    setup_method(m, student, teacher, torch.zeros(1, 3, 8, 8), train_size)
    return m


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, -1, 3, -1])
INDEX = torch.tensor([7, 2, 9, 0])


def test_nce_loss_is_the_papers_by_hand():
    """h(x) = x / (x + K/N), loss = -(1/B) sum_i [log h(x_i0) + sum_j log(1 - h(x_ij))]."""
    x = torch.tensor([[2.0, 0.5, 0.1, 1.5], [0.3, 0.2, 0.9, 0.05]])
    n, k = 20, 3
    total = 0.0
    for row in x.tolist():
        total += math.log(row[0] / (row[0] + k / n + 1e-7))
        total += sum(math.log((k / n) / (v + k / n + 1e-7)) for v in row[1:])
    assert nce_loss(x, n).item() == pytest.approx(-total / 2, rel=1e-6)


def test_scores_z_loss_and_banks_equal_torchdistill(models):
    student, teacher = models
    m = crd(student, teacher)
    ref = CRDLoss("s", "e", "t", input_size=6, output_size=10, num_negative_samples=5, num_samples=10,
                  temperature=0.07, momentum=0.5)
    ref.memory_v1.copy_(m.memory_s)  # v1: the student's bank, v2: the teacher's
    ref.memory_v2.copy_(m.memory_t)
    s_out, t_out = Outputs(student(X)), Outputs(teacher(X))
    with torch.no_grad():
        s_out.features["4"] = student[:5](X)
        t_out.features["3"] = teacher[:4](X)
    torch.manual_seed(3)
    parts = m(s_out, t_out, Y, 1, index=INDEX)
    torch.manual_seed(3)  # the same draw of negatives as the method's
    contrast = torch.randint(0, 10, (4, 6))
    contrast[:, 0] = INDEX
    e_s, e_t = m.embed_s(s_out.features["4"]), m.embed_t(t_out.features["3"])
    out_s, out_t = ref.contrast_memory(e_s, e_t, INDEX, contrast)
    expected = ref.compute_contrast_loss(out_s) + ref.compute_contrast_loss(out_t)
    assert parts["crd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert m.z.tolist() == pytest.approx([ref.params[2].item(), ref.params[3].item()], rel=1e-5)
    assert torch.allclose(m.memory_s, ref.memory_v1, atol=1e-6) and torch.allclose(m.memory_t, ref.memory_v2, atol=1e-6)
    kd = hinton_kd(s_out, t_out, Y, m.cfg, "crd")
    assert parts["loss"].item() == pytest.approx(kd["loss"].item() + 0.8 * expected.item(), rel=1e-5)
    parts["loss"].backward()  # both heads train
    assert m.embed_s.linear.weight.grad.abs().sum() > 0 and m.embed_t.linear.weight.grad.abs().sum() > 0


def test_scores_are_exp_of_the_dot_products_over_t():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    anchor = torch.tensor([[0.6, 0.8]])
    got = scores(bank, torch.tensor([[2, 0, 1]]), anchor, 0.5)
    assert got[0].tolist() == pytest.approx([math.exp(1.0 / 0.5), math.exp(0.6 / 0.5), math.exp(0.8 / 0.5)])


def test_the_bank_update_is_momentum_then_renormalisation_by_hand():
    bank = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    update_bank(bank, torch.tensor([2, 0]), torch.tensor([[2.0, 0.0], [0.0, 1.0]]), 0.25)
    # momentum 0.25 on the bank row, 0.75 on the new embedding (the authors' nce_m)
    row2 = [0.25 * 0 + 0.75 * 2, 0.25 * 2 + 0.75 * 0]  # (1.5, 0.5), then / its norm
    row0 = [0.25 * 3, 0.25 * 4 + 0.75]  # (0.75, 1.75)
    n2, n0 = math.hypot(*row2), math.hypot(*row0)
    assert bank[2].tolist() == pytest.approx([row2[0] / n2, row2[1] / n2])
    assert bank[0].tolist() == pytest.approx([row0[0] / n0, row0[1] / n0])
    assert bank[1].tolist() == [1.0, 0.0]  # untouched


def test_a_position_given_twice_is_updated_once_by_its_first_row():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    update_bank(bank, torch.tensor([1, 0, 1]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]), 0.5)
    assert bank[1].tolist() == pytest.approx([2 ** -0.5, 2 ** -0.5])  # from (0.5, 0.5), not (2.5, 3)


def test_two_ranks_updates_by_hand_leave_every_rank_the_same_bank():
    """What gather_rows hands each rank: both ranks' (index, rows) in rank order; applied on
    each rank's own copy, they give the same bank, unlike each rank's own rows alone."""
    (i0, r0), (i1, r1) = crd_ranks.rank_data(0), crd_ranks.rank_data(1)
    gathered = torch.cat([i0, i1]), torch.cat([r0, r1])
    banks = [crd_ranks.initial_bank(), crd_ranks.initial_bank()]
    for bank in banks:
        update_bank(bank, *gathered, 0.5)
    assert torch.equal(banks[0], banks[1])
    init = crd_ranks.initial_bank()
    for pos, row in [(0, r0[0]), (2, r0[1]), (5, r0[2]), (1, r1[0])]:  # 5: rank 0's row, first
        expected = torch.nn.functional.normalize(0.5 * init[pos] + 0.5 * row, dim=0)
        assert torch.allclose(banks[0][pos], expected)
    assert torch.equal(banks[0][[3, 4]], init[[3, 4]])
    alone = crd_ranks.initial_bank()
    update_bank(alone, i0, r0, 0.5)
    assert not torch.equal(alone, banks[0])  # rank 1's rows matter


def test_gather_rows_in_a_process_group_of_one(tmp_path):
    index, rows = torch.tensor([4, 1]), torch.randn(2, 3)
    assert gather_rows(index, rows) == (index, rows)  # no process group: as given
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=20))
    try:
        got_index, got_rows = gather_rows(index, rows)
    finally:
        dist.destroy_process_group()
    assert torch.equal(got_index, index) and torch.equal(got_rows, rows)


def test_two_gloo_ranks_hold_the_same_bank(tmp_path):
    gloo.spawn_two(crd_ranks.run_rank, tmp_path, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["index"].tolist() == r1["index"].tolist() == [0, 2, 5, 1, 5]  # rank order, sizes 3 and 2
    assert torch.equal(r0["bank"], r1["bank"])
    expected = crd_ranks.initial_bank()
    (i0, w0), (i1, w1) = crd_ranks.rank_data(0), crd_ranks.rank_data(1)
    update_bank(expected, torch.cat([i0, i1]), torch.cat([w0, w1]), 0.5)
    assert torch.equal(r0["bank"], expected)


def test_banks_z_and_heads_round_trip_through_the_state(models):
    student, teacher = models
    m = crd(student, teacher)
    step = TrainStep(student, m)
    assert {"method.embed_s.linear.weight", "method.embed_t.linear.weight"} <= {n for n, _ in step.named_parameters()}
    before = m.memory_s.clone()
    step(X, Y, 1, teacher=teacher, index=INDEX)
    state = m.state_dict()
    assert {"memory_s", "memory_t", "z"} <= set(state) and state["memory_s"].shape == (10, 6)
    assert (state["z"] > 0).all() and not torch.equal(state["memory_s"][INDEX], before[INDEX])
    assert torch.equal(state["memory_s"][[1, 3]], before[[1, 3]])  # rows of other images untouched
    assert torch.allclose(state["memory_t"][INDEX].norm(dim=1), torch.ones(4))
    fresh = crd(student, teacher)
    fresh.load_state_dict(state)  # what a resumed worker does with checkpoint["method"]
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_trains_on_indexed_batches_with_unlabelled_images(models):
    student, teacher = models
    m = crd(student, teacher, train_size=12)
    data = DataLoader(Indexed(TensorDataset(torch.randn(12, 3, 8, 8), torch.tensor([0, -1, 2] * 4))), batch_size=4)
    step = TrainStep(student, m)
    sums = train_one_epoch(step, data, torch.optim.SGD(step.parameters(), lr=0.1), epoch=1,
                           device=torch.device("cpu"), teacher=teacher)
    assert math.isfinite(sums["loss_sum"]) and sums["crd_sum"] > 0 and sums["images"] == 12
    assert torch.allclose(m.memory_s.norm(dim=1), torch.ones(12))  # every row seen, renormalised


def test_setup_errors_are_one_line(models):
    student, teacher = models
    with pytest.raises(ConfigError, match="crd needs distill.params.student_layer and") as exc:
        crd(student, teacher, student_layer=None)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="teacher layer 'avgpool' is not in Sequential"):
        crd(student, teacher, teacher_layer="avgpool")
    with pytest.raises(ConfigError, match="nce_t must be > 0"):
        build_method(DistillConfig(loss="crd", params={"nce_t": 0}))
    with pytest.raises(ConfigError, match="nce_m must be in"):
        build_method(DistillConfig(loss="crd", params={"nce_m": 1.0}))
    m = build_method(DistillConfig(loss="crd", params={"student_layer": "4", "teacher_layer": "3"}))
    with pytest.raises(ConfigError, match="training set's size"):
        m.setup(student, teacher, torch.zeros(1, 3, 8, 8))
