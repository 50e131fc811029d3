"""Feature methods (fitnets, at) on small models: against torchdistill's AT loss and FitNets' MSE
hint loss (features taken with torchdistill's own forward hooks), setup checks, the trainable
regressor in the step, the optimizer and the method's state."""
import pytest
import torch
from torch import nn
from torchdistill.core.forward_hook import ForwardHookManager
from torchdistill.losses.mid_level import ATLoss, SimpleLossWrapper

from kd_ray.config import DistillConfig
from kd_ray.errors import ConfigError
from kd_ray.methods import TrainStep, build_method


def net(width):
    """conv(8x8) -> relu '1' (width x 8 x 8) -> conv stride 2 -> relu '3' (width x 4 x 4) -> head."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))


@pytest.fixture
def models():
    torch.manual_seed(0)
    return net(4), net(8).eval().requires_grad_(False)


def method(name, temp=4.0, kd_alpha=0.9, **params):
    return build_method(DistillConfig(loss=name, temperature=temp, alpha=kd_alpha, params=params))


def ready(name, student, teacher, **params):
    m = method(name, **params)
    m.setup(student, teacher, torch.zeros(1, 3, 8, 8))
    return m


def hooked_io(model, paths, x):
    """Outputs of ``paths`` by torchdistill's ForwardHookManager (not our FeatureTap)."""
    manager = ForwardHookManager(torch.device("cpu"))
    for path in paths:
        manager.add_hook(model, path, requires_input=False, requires_output=True)
    out = model(x)
    return out, manager.pop_io_dict()


X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, -1, 3, -1, 4])


def test_fitnets_hint_equals_torchdistill_mse_hint(models):
    student, teacher = models
    m = ready("fitnets", student, teacher, student_layer="3", teacher_layer="3", weight=2.0)
    conv, bn, relu = m.regressor  # mdistiller's ConvReg at equal size: 1x1 conv, BN, ReLU
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    assert (conv.in_channels, conv.out_channels) == (4, 8)
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 8 and isinstance(relu, nn.ReLU)
    parts = TrainStep(student, m)(X, Y, 1, teacher=teacher)
    # Reference: torchdistill's FitNets hint, MSE between the regressor's output and the teacher's
    # layer, wired with its SimpleLossWrapper over io dicts from its own hooks.
    s_logits, s_io = hooked_io(student, ["3"], X)
    t_logits, t_io = hooked_io(teacher, ["3"], X)
    s_io["regressor"] = {"output": m.regressor(s_io["3"]["output"])}
    hint = SimpleLossWrapper(nn.MSELoss(), input={"is_from_teacher": False, "module_path": "regressor", "io": "output"},
                             target={"is_from_teacher": True, "module_path": "3", "io": "output"})(s_io, t_io, None)
    assert parts["hint"].item() == pytest.approx(hint.item(), rel=1e-5)
    kd = method("kd").loss(s_logits, t_logits, Y)
    assert parts["kd"].item() == pytest.approx(kd["kd"].item(), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(kd["loss"].item() + 2.0 * hint.item(), rel=1e-5)


@pytest.mark.parametrize("pairs", [(["1"], None), (["1", "3"], None), (["3"], ["2"])])
def test_at_equals_torchdistill_at_loss(models, pairs):
    student, teacher = models
    s_layers, t_layers = pairs
    params = {"student_layers": s_layers, "beta": 500.0, **({"teacher_layers": t_layers} if t_layers else {})}
    m = ready("at", student, teacher, **params)
    parts = TrainStep(student, m)(X, Y, 1, teacher=teacher)
    t_layers = t_layers or s_layers
    s_logits, s_io = hooked_io(student, s_layers, X)
    t_logits, t_io = hooked_io(teacher, t_layers, X)
    at_pairs = {f"pair{i}": {"student": {"io": "output", "path": s}, "teacher": {"io": "output", "path": t}, "weight": 1}
                for i, (s, t) in enumerate(zip(s_layers, t_layers))}
    ref = ATLoss(at_pairs, mode="code")(s_io, t_io)
    assert parts["at"].item() == pytest.approx(ref.item(), rel=1e-5)
    kd = method("kd").loss(s_logits, t_logits, Y)["loss"]
    assert parts["loss"].item() == pytest.approx(kd.item() + 500.0 * ref.item(), rel=1e-5)


def test_at_is_zero_between_equal_maps_and_ignores_channel_count():
    from kd_ray.methods.features import at_loss

    f = torch.rand(2, 4, 5, 5)
    assert at_loss(f, f.repeat(1, 3, 1, 1)).item() == pytest.approx(0, abs=1e-7)  # same |a|^2 mean per pixel
    assert at_loss(f, torch.rand(2, 16, 5, 5)).item() > 0


@pytest.mark.parametrize("name, params", [
    ("fitnets", {"student_layer": "3", "teacher_layer": "3"}),
    ("at", {"student_layers": ["1", "3"]}),
])
def test_feature_methods_are_finite_without_labels(models, name, params):
    student, teacher = models
    m = ready(name, student, teacher, **params)
    step = TrainStep(student, m)
    parts = step(X, torch.full((6,), -1), 1, teacher=teacher)
    assert all(torch.isfinite(v) for v in parts.values()) and parts["ce"].item() == 0.0
    parts["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in step.parameters() if p.grad is not None)
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen


def test_the_regressor_trains_with_the_student_and_lives_in_the_method_state(models):
    from torch.utils.data import DataLoader, TensorDataset

    from kd_ray.engine import train_one_epoch

    student, teacher = models
    m = ready("fitnets", student, teacher, student_layer="3", teacher_layer="3")
    step = TrainStep(student, m)
    assert {"method.regressor.0.weight", "method.regressor.1.weight"} <= {n for n, _ in step.named_parameters()}
    before = m.regressor[0].weight.detach().clone()
    data = DataLoader(TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(-1, 5, (16,))), batch_size=4)
    sums = train_one_epoch(step, data, torch.optim.SGD(step.parameters(), lr=0.1), epoch=1,
                           device=torch.device("cpu"), teacher=teacher)
    assert {"hint_sum", "kd_sum", "ce_sum"} <= set(sums) and sums["teacher_images"] == 16
    assert not torch.equal(before, m.regressor[0].weight)
    state = m.state_dict()
    assert {"regressor.0.weight", "regressor.0.bias", "regressor.1.weight", "regressor.1.running_mean"} <= set(state)
    fresh = ready("fitnets", net(4), teacher, student_layer="3", teacher_layer="3")
    fresh.load_state_dict(state)  # what a resumed worker does with checkpoint["method"]
    assert torch.equal(fresh.regressor[0].weight, m.regressor[0].weight)
    assert torch.equal(fresh.regressor[1].running_mean, m.regressor[1].running_mean)


def test_fitnets_maps_vectors_with_a_linear_regressor(models):
    student, teacher = models
    m = ready("fitnets", student, teacher, student_layer="5", teacher_layer="5")  # Flatten: (B, C)
    assert isinstance(m.regressor, nn.Linear) and (m.regressor.in_features, m.regressor.out_features) == (4, 8)
    assert torch.isfinite(TrainStep(student, m)(X, Y, 1, teacher=teacher)["hint"])


# ----- setup checks: what the driver runs before Ray starts -----------------------------------

def error_of(name, models, **params):
    with pytest.raises(ConfigError) as err:
        ready(name, *models, **params)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_missing_layer_names_the_nearest_ones():
    from torchvision.models import resnet18

    student, teacher = resnet18(num_classes=5), net(8)
    message = error_of("fitnets", (student, teacher), student_layer="layer5", teacher_layer="3")
    assert "student layer 'layer5' is not in ResNet" in message
    for name in ("layer1", "layer2", "layer3", "layer4"):
        assert name in message
    message = error_of("at", (student, student), student_layers=["layer3.1.conv"])
    assert "layer3.1.conv1" in message and "layer3.1.conv2" in message


def test_unmappable_shapes_name_both_shapes_and_the_fix(models):
    student, teacher = models
    small = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=3), nn.ReLU(),  # '1': 4x3x3
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    message = error_of("fitnets", (small, teacher), student_layer="1", teacher_layer="1")
    assert "student layer '1' (4x3x3)" in message and "teacher layer '1' (8x8x8)" in message
    assert "teacher layers at 3x3: none" in message and "distill.params.teacher_layer" in message
    message = error_of("fitnets", models, student_layer="5", teacher_layer="3")
    assert "(4)" in message and "(8x4x4)" in message
    message = error_of("at", models, student_layers=["5"], teacher_layers=["1"])  # (B, C): no map
    assert "student layer '5' (4)" in message and "teacher layer '1' (8x8x8)" in message
    assert "(C, H, W) outputs" in message


def test_layers_must_be_named(models):
    assert "distill.params.student_layer and distill.params.teacher_layer" in error_of("fitnets", models)
    assert "distill.params.student_layers" in error_of("at", models)
    with pytest.raises(ConfigError, match="must pair up"):
        method("at", student_layers=["1", "3"], teacher_layers=["1"])
    with pytest.raises(ConfigError, match="list of module paths"):
        method("at", student_layers=[True])
    assert method("at", student_layers=[1, "3"]).student_layers == ("1", "3")  # YAML's [1, 3]
    with pytest.raises(ConfigError, match="distill.params.student_layers must be list"):
        method("at", student_layers="layer3")


def test_a_layer_followed_by_an_in_place_op_still_trains():
    """A BatchNorm output that an inplace ReLU then changes: the kept copy is the BN's output, and
    the student's backward pass is not broken by the in-place change."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    teacher = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    m = ready("fitnets", student, teacher, student_layer="1", teacher_layer="1")
    parts = TrainStep(student, m)(X, Y, 1, teacher=teacher)
    parts["loss"].backward()
    assert student[0].weight.grad is not None and m.regressor[0].weight.grad is not None
    with torch.no_grad():
        t_bn = teacher[1](teacher[0](X))
    assert (t_bn < 0).any()  # BN outputs are negative somewhere: the ReLU did not touch the copy
    s_bn = student[1](student[0](X))
    expected = torch.nn.functional.mse_loss(m.regressor(s_bn), t_bn)
    assert parts["hint"].item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("s_layer, t_layer, conv_type, kernel", [
    ("1", "3", nn.Conv2d, (3, 3)),            # student 8x8 -> teacher 4x4: 3x3 stride 2
    ("3", "1", nn.ConvTranspose2d, (4, 4)),   # student 4x4 -> teacher 8x8: transposed 4x4 stride 2
    ("3", "3", nn.Conv2d, (1, 1)),
])
def test_fitnets_conv_reg_maps_each_size_onto_the_teachers(models, s_layer, t_layer, conv_type, kernel):
    student, teacher = models
    m = ready("fitnets", student, teacher, student_layer=s_layer, teacher_layer=t_layer)
    conv, bn, relu = m.regressor
    assert type(conv) is conv_type and conv.kernel_size == kernel
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
    _, s_io = hooked_io(student, [s_layer], X)
    with torch.no_grad():
        _, t_io = hooked_io(teacher, [t_layer], X)
    out = m.regressor(s_io[s_layer]["output"])
    assert out.shape == t_io[t_layer]["output"].shape and (out >= 0).all()
    parts = TrainStep(student, m)(X, Y, 1, teacher=teacher)
    assert parts["hint"].item() == pytest.approx(torch.nn.functional.mse_loss(out, t_io[t_layer]["output"]).item(),
                                                 rel=1e-5)


def test_fitnets_conv_reg_valid_conv_for_a_larger_student_map():
    from kd_ray.methods.features import conv_reg

    conv = conv_reg((4, 7, 6), (8, 4, 4))[0]
    assert conv.kernel_size == (4, 3) and conv(torch.zeros(1, 4, 7, 6)).shape == (1, 8, 4, 4)
    assert conv_reg((4, 3, 3), (8, 8, 8)) is None  # smaller, not half: refused


def authors_at(s, t):
    """The authors' (and mdistiller's) at(x) = normalize(x.pow(2).mean(1).view(B, -1))."""
    def at(x):
        return torch.nn.functional.normalize(x.pow(2).mean(1).view(x.size(0), -1))
    return (at(s) - at(t)).pow(2).mean()


def test_at_adds_beta_times_the_authors_term_summed_over_pairs():
    """beta * sum over pairs, not beta / 2 (szagoruyko/attention-transfer's cifar.py and mdistiller)."""
    g = torch.Generator().manual_seed(3)
    pairs = [(torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 5, 4, 4, generator=g)),
             (torch.rand(2, 6, 2, 2, generator=g), torch.rand(2, 2, 2, 2, generator=g))]
    s_feats = {"a": pairs[0][0], "b": pairs[1][0]}
    t_feats = {"a": pairs[0][1], "b": pairs[1][1]}
    logits_s, logits_t = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    labels = torch.tensor([1, 3])
    m = method("at", student_layers=["a", "b"], beta=1000.0)
    from kd_ray.methods import Outputs
    parts = m(Outputs(logits_s, s_feats), Outputs(logits_t, t_feats), labels, 1)
    by_hand = sum(authors_at(s, t) for s, t in pairs)
    kd = method("kd").loss(logits_s, logits_t, labels)["loss"]
    assert parts["at"].item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert parts["loss"].item() == pytest.approx(kd.item() + 1000.0 * by_hand.item(), rel=1e-6)


def test_at_pools_the_larger_map_to_the_smaller_size(models):
    student, teacher = models
    m = ready("at", student, teacher, student_layers=["3"], teacher_layers=["1"])  # 4x4 vs 8x8
    parts = TrainStep(student, m)(X, Y, 1, teacher=teacher)
    _, s_io = hooked_io(student, ["3"], X)
    with torch.no_grad():
        _, t_io = hooked_io(teacher, ["1"], X)
    t_map = t_io["1"]["output"]
    expected = authors_at(s_io["3"]["output"], torch.nn.functional.adaptive_avg_pool2d(t_map, (4, 4)))
    assert parts["at"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["at"].item() != pytest.approx(authors_at(s_io["3"]["output"], t_map[:, :, ::2, ::2]).item(), rel=1e-3)
    # and the other way round: the student's larger map is pooled
    m = ready("at", student, teacher, student_layers=["1"], teacher_layers=["3"])
    _, s_io = hooked_io(student, ["1"], X)
    _, t_io = hooked_io(teacher, ["3"], X)
    expected = authors_at(torch.nn.functional.adaptive_avg_pool2d(s_io["1"]["output"], (4, 4)), t_io["3"]["output"])
    assert TrainStep(student, m)(X, Y, 1, teacher=teacher)["at"].item() == pytest.approx(expected.item(), rel=1e-5)
