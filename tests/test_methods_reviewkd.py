"""reviewkd on fixed tensors: the HCL by hand and against torchdistill's HierarchicalContextLoss, the
ABF against torchdistill's AttentionBasedFusion, the fused shapes, the ABF extras in the step and
the state, the total loss, and setup's one-line errors."""
import pytest
import torch
from torch import nn
from torchdistill.losses.mid_level import HierarchicalContextLoss
from torchdistill.models.wrapper import AttentionBasedFusion

from kd_ray.config import DistillConfig
from kd_ray.errors import ConfigError
from kd_ray.methods import Outputs, TrainStep, build_method
from kd_ray.methods.logits import hinton_kd
from kd_ray.methods.reviewkd import ABF, hcl


def net(width):
    """conv -> relu '1' (w x 8 x 8) -> conv s2 -> relu '3' (2w x 4 x 4) -> conv s2 -> relu '5'
    (4w x 2 x 2) -> pool '6' -> flatten '7' (4w) -> linear (5 classes)."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.ReLU(),
                         nn.Conv2d(2 * width, 4 * width, 3, padding=1, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 5))


@pytest.fixture
def models():
    torch.manual_seed(0)
    return net(2), net(4).eval().requires_grad_(False)


def review(student, teacher, kd_alpha=0.9, **params):
    m = build_method(DistillConfig(loss="reviewkd", temperature=4.0, alpha=kd_alpha, params=params))
    m.setup(student, teacher, torch.zeros(1, 3, 8, 8))
    return m


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, -1, 3, -1])


def test_hcl_by_hand_on_an_8x8_map():
    g = torch.Generator().manual_seed(2)
    fs, ft = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    def mse(a, b):
        return ((a - b) ** 2).mean().item()

    def pool(x, k):  # 8x8 -> kxk by block means
        return x.reshape(2, 3, k, 8 // k, k, 8 // k).mean(dim=(3, 5))

    levels = mse(fs, ft) + 0.5 * mse(pool(fs, 4), pool(ft, 4)) + 0.25 * mse(pool(fs, 2), pool(ft, 2)) \
        + 0.125 * mse(pool(fs, 1), pool(ft, 1))
    assert hcl(fs, ft).item() == pytest.approx(levels / (1 + 0.5 + 0.25 + 0.125), rel=1e-6)


def test_hcl_skips_levels_not_below_the_maps_height():
    fs, ft = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    fs[0, 0, 0, 0] = 3.0  # full MSE (9 + 0 + 0 + 0 + 3 * 1) / 4 = 3; 1x1: mean 1.5 -> 2.25
    assert hcl(fs, ft).item() == pytest.approx((3.0 + 0.5 * 2.25) / 1.5)


@pytest.mark.parametrize("size", [8, 4, 2, 1])
def test_hcl_equals_torchdistill(size):
    g = torch.Generator().manual_seed(size)
    fs, ft = torch.randn(3, 5, size, size, generator=g), torch.randn(3, 5, size, size, generator=g)
    ref = HierarchicalContextLoss("s", "output", "t", "output")
    assert hcl(fs, ft).item() == pytest.approx(ref({"s": {"output": (fs, None)}}, {"t": {"output": ft}}).item(), rel=1e-6)


@pytest.mark.parametrize("fuse", [True, False])
def test_abf_equals_torchdistills_at_equal_sizes(fuse):
    torch.manual_seed(0)
    ours, ref = ABF(4, 6, 8, fuse), AttentionBasedFusion(4, 6, 8, uses_attention=fuse)
    ref.load_state_dict(ours.state_dict())  # the same module names and shapes
    x, deeper = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2)
    a = ours(x, deeper if fuse else None, (4, 4))
    b = ref(x, deeper if fuse else None, 4)
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], b[1], atol=1e-6)


def test_abf_resizes_its_output_to_the_teachers_map():
    abf = ABF(4, 6, 8, fuse=True)
    out, passed_on = abf(torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2), (8, 8))
    assert out.shape == (2, 8, 8, 8) and passed_on.shape == (2, 6, 8, 8)


def test_fused_shapes_match_the_teachers_layers_and_extras_are_state(models):
    student, teacher = models
    m = review(student, teacher, student_layers=[1, 3, 5, 7])  # 7: the pooled vector, a 1x1 map
    assert [a.attention_conv is not None for a in m.abfs] == [True, True, True, False]
    assert m.abfs[0].conv1[0].in_channels == 2 and m.abfs[0].conv2[0].out_channels == 4
    assert m.abfs[0].conv1[0].out_channels == 8  # min(512, the deepest student layer's channels)
    feats = [student[:2](X), student[:4](X), student[:6](X), student[:8](X)[:, :, None, None]]
    fused = m.fuse(feats)
    assert [tuple(f.shape) for f in fused] == [(4, 4, 8, 8), (4, 8, 4, 4), (4, 16, 2, 2), (4, 16, 1, 1)]
    step = TrainStep(student, m)
    names = {n for n, _ in step.named_parameters()}
    assert {"method.abfs.0.conv1.0.weight", "method.abfs.0.attention_conv.0.weight",
            "method.abfs.3.conv2.1.weight"} <= names
    state = m.state_dict()
    assert "abfs.2.conv2.1.running_mean" in state
    fresh = review(student, teacher, student_layers=[1, 3, 5, 7])
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_the_loss_is_kd_plus_weight_times_the_summed_hcl(models):
    student, teacher = models
    m = review(student, teacher, student_layers=[3, 5], teacher_layers=[3, 5], weight=2.0, mid_channels=3)
    parts = TrainStep(student, m)(X, Y, 1, teacher=teacher)
    with torch.no_grad():
        fused = m.fuse([student[:4](X), student[:6](X)])
        expected = hcl(fused[0], teacher[:4](X)) + hcl(fused[1], teacher[:6](X))
    assert parts["review"].item() == pytest.approx(expected.item(), rel=1e-5)
    kd = hinton_kd(Outputs(student(X)), Outputs(teacher(X)), Y, m.cfg, "reviewkd")
    assert parts["loss"].item() == pytest.approx(kd["loss"].item() + 2.0 * expected.item(), rel=1e-5)
    parts["loss"].backward()
    assert all(p.grad is not None for p in m.parameters())  # every ABF trains


def test_warmup_ramps_the_review_loss(models):
    student, teacher = models
    m = review(student, teacher, kd_alpha=0.0, student_layers=[5], warmup=4)
    m.eval()  # BatchNorm in eval: the same review loss at every call
    a = TrainStep(student, m).eval()(X, Y, 1, teacher=teacher)
    b = TrainStep(student, m).eval()(X, Y, 8, teacher=teacher)
    assert a["review"].item() == pytest.approx(b["review"].item())
    assert (a["loss"] - a["ce"]).item() == pytest.approx(0.25 * (b["loss"] - b["ce"]).item(), rel=1e-5)


def test_setup_errors_are_one_line(models):
    student, teacher = models
    with pytest.raises(ConfigError, match="reviewkd needs distill.params.student_layers"):
        review(student, teacher)
    with pytest.raises(ConfigError, match="student layer '5' .* is larger than the layer before it, '7'") as exc:
        review(student, teacher, student_layers=[7, 5])
    assert "\n" not in str(exc.value) and "shallow to deep" in str(exc.value)
    with pytest.raises(ConfigError, match="teacher layer 'layer9' is not in Sequential"):
        review(student, teacher, student_layers=[3], teacher_layers=["layer9"])
    with pytest.raises(ConfigError, match="must pair up one to one"):
        review(student, teacher, student_layers=[3, 5], teacher_layers=[3])
    with pytest.raises(ConfigError, match="mid_channels must be >= 1"):
        review(student, teacher, student_layers=[3], mid_channels=0)
