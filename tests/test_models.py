import pytest
import torch
import torchvision

from kd_ray.errors import ConfigError, TeacherError
from kd_ray.models import (
    MODELS, build_model, check_teacher_matches, count_params, export_teacher, load_teacher,
    load_weights, read_teacher_info,
)

TORCHVISION = ["resnet18", "resnet34", "resnet50", "densenet121", "vgg16",
               "mobilenet_v3_small", "efficientnet_b0"]


def test_registered_names():
    names = MODELS.names()
    for name in TORCHVISION + ["simple_cnn", "tiny_cnn", "cnn_teacher"]:
        assert name in names


def test_unknown_model_lists_choices():
    with pytest.raises(ConfigError, match="resnet18"):
        build_model("resnet9000", 7)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "simple_cnn", "tiny_cnn",
                                  "cnn_teacher"])
def test_output_shapes(name):
    model = build_model(name, 7).eval()
    sizes = [28, 64] + ([224] if name == "resnet18" else [])
    with torch.no_grad():
        for size in sizes:
            assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name,low,high", [
    ("tiny_cnn", 4_000, 10_000), ("simple_cnn", 20_000, 35_000),
    ("cnn_teacher", 300_000, 500_000), ("resnet18", 11_000_000, 11_300_000),
])
def test_param_counts(name, low, high):
    assert low <= count_params(build_model(name, 10)) <= high


def test_pretrained_skips_mismatched_head(tmp_path):
    source = torchvision.models.resnet18(weights=None, num_classes=1000)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    model = build_model("resnet18", 7, pretrained=str(path))
    assert model.fc.out_features == 7
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_mean, source.layer4[1].bn2.running_mean)
    assert load_weights(build_model("resnet18", 7), path) == ["fc.bias", "fc.weight"]


def test_pretrained_raw_state_dict_and_model_key(tmp_path):
    source = build_model("simple_cnn", 3)
    for i, payload in enumerate([source.state_dict(), {"model": source.state_dict()}]):
        path = tmp_path / f"w{i}.pt"
        torch.save(payload, path)
        model = build_model("simple_cnn", 3, pretrained=str(path))
        assert torch.equal(model[0].weight, source[0].weight)


def test_pretrained_missing_file():
    with pytest.raises(ConfigError, match="not found.*never downloaded"):
        build_model("simple_cnn", 7, pretrained="/nope/weights.pth")


def test_pretrained_wrong_architecture(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(build_model("tiny_cnn", 7).state_dict(), path)
    with pytest.raises(ConfigError, match="do not fit architecture resnet18"):
        build_model("resnet18", 7, pretrained=str(path))


def test_teacher_round_trip(tmp_path):
    model = build_model("cnn_teacher", 3).eval()
    path = tmp_path / "out" / "teacher.pt"
    export_teacher(path, model, "cnn_teacher", ["a", "b", "c"], 28, extra={"val_acc": 0.9})
    assert [p.name for p in path.parent.iterdir()] == ["teacher.pt"]  # no temp file left
    info = read_teacher_info(path)
    assert "state_dict" not in info
    assert info["format"] == "kd_ray-teacher-v1" and info["arch"] == "cnn_teacher"
    assert info["num_classes"] == 3 and info["classes"] == ["a", "b", "c"]
    assert info["image_size"] == 28 and info["extra"] == {"val_acc": 0.9}
    teacher, info2 = load_teacher(path)
    assert info2 == info and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(teacher(x), model(x))


def test_export_strips_ddp_prefix(tmp_path):
    inner = build_model("tiny_cnn", 2)
    wrapper = torch.nn.Module()
    wrapper.module = inner  # looks like DDP: keys start with "module."
    path = tmp_path / "t.pt"
    export_teacher(path, wrapper, "tiny_cnn", ["x", "y"], 32)
    teacher, _ = load_teacher(path)
    assert torch.equal(teacher[0].weight, inner[0].weight)


def test_teacher_missing_file(tmp_path):
    with pytest.raises(TeacherError, match="not found.*train-teacher"):
        read_teacher_info(tmp_path / "teacher.pt")
    with pytest.raises(TeacherError):
        load_teacher(tmp_path / "teacher.pt")


def test_teacher_bad_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(TeacherError, match="unreadable"):
        read_teacher_info(junk)
    plain = tmp_path / "plain.pt"
    torch.save(build_model("tiny_cnn", 2).state_dict(), plain)
    with pytest.raises(TeacherError, match="not a kd_ray teacher file"):
        read_teacher_info(plain)


def test_check_teacher_matches():
    info = {"classes": [str(i) for i in range(10)]}
    check_teacher_matches(info, [str(i) for i in range(10)])
    with pytest.raises(TeacherError, match=r"teacher has 10 classes \(0\.\.9\) but the dataset has 3 \(a, b, c\)"):
        check_teacher_matches(info, ["a", "b", "c"])
    with pytest.raises(TeacherError, match="class 1 is 'b'"):
        check_teacher_matches({"classes": ["a", "b", "c"]}, ["a", "c", "b"])


def test_model_plugin_by_module_path():
    model = build_model("tests.plugins:linear_model", 3)
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 3)
    with pytest.raises(ConfigError, match="cannot import 'nowhere'"):
        build_model("nowhere:net", 3)
