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
    assert isinstance(m.regressor, nn.Conv2d) and m.regressor.kernel_size == (1, 1)
    assert (m.regressor.in_channels, m.regressor.out_channels) == (4, 8)
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
    assert parts["loss"].item() == pytest.approx(kd.item() + 500.0 / 2 * ref.item(), rel=1e-5)


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
    assert {"method.regressor.weight", "method.regressor.bias"} <= {n for n, _ in step.named_parameters()}
    before = m.regressor.weight.detach().clone()
    data = DataLoader(TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(-1, 5, (16,))), batch_size=4)
    sums = train_one_epoch(step, data, torch.optim.SGD(step.parameters(), lr=0.1), epoch=1,
                           device=torch.device("cpu"), teacher=teacher)
    assert {"hint_sum", "kd_sum", "ce_sum"} <= set(sums) and sums["teacher_images"] == 16
    assert not torch.equal(before, m.regressor.weight)
    state = m.state_dict()
    assert set(state) == {"regressor.weight", "regressor.bias"}
    fresh = ready("fitnets", net(4), teacher, student_layer="3", teacher_layer="3")
    fresh.load_state_dict(state)  # what a resumed worker does with checkpoint["method"]
    assert torch.equal(fresh.regressor.weight, m.regressor.weight)


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
    message = error_of("fitnets", models, student_layer="1", teacher_layer="3")
    assert "student layer '1' (4x8x8)" in message and "teacher layer '3' (8x4x4)" in message
    assert "teacher layers at 8x8: 0, 1" in message and "distill.params.teacher_layer" in message
    message = error_of("fitnets", models, student_layer="5", teacher_layer="3")
    assert "(4)" in message and "(8x4x4)" in message
    message = error_of("at", models, student_layers=["3"], teacher_layers=["1"])
    assert "student layer '3' (4x4x4)" in message and "teacher layer '1' (8x8x8)" in message
    assert "teacher layers at 4x4: 2, 3" in message


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
    assert student[0].weight.grad is not None and m.regressor.weight.grad is not None
    with torch.no_grad():
        t_bn = teacher[1](teacher[0](X))
    assert (t_bn < 0).any()  # BN outputs are negative somewhere: the ReLU did not touch the copy
    s_bn = student[1](student[0](X))
    expected = torch.nn.functional.mse_loss(m.regressor(s_bn), t_bn)
    assert parts["hint"].item() == pytest.approx(expected.item(), rel=1e-4)
