"""A teacher brought from elsewhere (`kd-ray import-teacher`), teachers at their own input size and
normalisation, and teacher ensembles: pure PyTorch, no Ray."""
import argparse
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from kd_ray.cli import main
from kd_ray.config import load_config
from kd_ray.data import build_data, write_synthetic_imagefolder
from kd_ray.models import (InputAdapter, TeacherEnsemble, build_model, export_teacher, load_teachers,
                           read_teacher_info)
from kd_ray.models.importer import fit_weights, module_prefix, read_weights
from kd_ray.errors import TeacherError

CLASSES = 3


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    write_synthetic_imagefolder(root, num_classes=CLASSES, per_class=(6, 4), image_size=32)
    return root


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    import kd_ray.cluster.stage

    monkeypatch.setattr(kd_ray.cluster.stage, "ensure_ray", lambda *a, **k: pytest.fail("Ray started"))


def resnet18_state(num_classes=CLASSES, seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes).state_dict()


def cli(capsys, tree, tmp_path, *args):
    code = main(["import-teacher", "--set", "data.name=imagefolder", "--set", f"data.root={tree}",
                 "--set", f"run.storage={tmp_path / 'out'}", *args])
    return code, capsys.readouterr()


def test_import_torchvision_state_dict_evaluates_and_exports(capsys, tree, tmp_path, caplog):
    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18_state(), weights)
    out = tmp_path / "t" / "teacher.pt"
    with caplog.at_level("INFO", logger="kd_ray"):
        code, _ = cli(capsys, tree, tmp_path, "--arch", "resnet18", "--weights", str(weights),
                      "--out", str(out), "--image-size", "48",
                      "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225")
    assert code == 0
    text = caplog.text
    assert "evaluating the teacher on the validation split: 12 images" in text
    info = read_teacher_info(out)
    assert info["arch"] == "resnet18" and info["image_size"] == 48
    assert info["mean"] == [0.485, 0.456, 0.406] and info["std"] == [0.229, 0.224, 0.225]
    assert info["classes"] == ["class0", "class1", "class2"]
    top1 = info["extra"]["val_top1"]
    assert f"val top-1 {100 * top1:.2f}%" in text
    # The printed top-1 is the teacher's, measured as distillation feeds it (32 px -> 48 px).
    model = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
    model.load_state_dict(torch.load(weights))
    bundle = build_data(load_config(None, ["data.name=imagefolder", f"data.root={tree}"]).data,
                        "teacher", 0)
    adapter = InputAdapter(32, bundle.norm, 48, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    images = torch.stack([bundle.val[i][0] for i in range(len(bundle.val))])
    labels = torch.tensor([bundle.val[i][1] for i in range(len(bundle.val))])
    with torch.no_grad():
        expected = (model.eval()(adapter(images)).argmax(1) == labels).float().mean().item()
    assert top1 == pytest.approx(expected)


class Exploding:
    """Unpickling this would run ``os.remove`` on a marker file: the import must not."""

    def __reduce__(self):
        return (os.remove, (str(MARKER),))


MARKER = Path(tempfile.gettempdir()) / "kd_ray_import_marker"


@pytest.mark.parametrize("kind", ["safetensors", "lightning", "timm_ckpt"])
def test_weight_formats(tmp_path, kind):
    state = resnet18_state()
    if kind == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif kind == "lightning":  # a LightningModule whose network is self.student, beside its teacher
        path = tmp_path / "epoch=3.ckpt"
        other = torchvision.models.resnet50(weights=None, num_classes=CLASSES).state_dict()
        # hyper_parameters hold objects torch.load(weights_only=True) refuses; none of them runs.
        torch.save({"epoch": 3, "hyper_parameters": {"args": argparse.Namespace(lr=0.1),
                                                     "hook": Exploding()},
                    "state_dict": {**{f"student.{k}": v for k, v in state.items()},
                                   **{f"teacher.{k}": v for k, v in other.items()}}}, path)
    else:  # timm's train.py: state_dict plus an EMA copy, DDP prefixes
        path = tmp_path / "checkpoint.pth.tar"
        torch.save({"arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in state.items()},
                    "state_dict_ema": {}}, path)
    MARKER.write_text("x")
    model = fit_weights(build_model("resnet18", CLASSES), read_weights(path), "resnet18", path)
    assert MARKER.exists()  # nothing in the file ran
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_module_prefix_picks_the_best_match():
    own = ["fc.weight", "fc.bias", "conv1.weight"]
    assert module_prefix(["fc.weight", "fc.bias", "conv1.weight"], own) == ""
    assert module_prefix(["model.fc.weight", "model.fc.bias", "model.conv1.weight", "x.fc.weight"],
                         own) == "model."


def test_timm_model(tmp_path, capsys, tree):
    import timm  # the optional `timm` extra; the `dev` extra installs it

    model = timm.create_model("resnet10t", pretrained=False, num_classes=CLASSES)
    weights = tmp_path / "timm.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, weights)
    code, _ = cli(capsys, tree, tmp_path, "--arch", "timm:resnet10t", "--weights", str(weights))
    assert code == 0
    out = tmp_path / "out" / "teacher-timm-resnet10t" / "teacher.pt"
    teacher = load_teachers([str(out)], None, 32, ((0.5,) * 3, (0.5,) * 3))
    assert teacher(torch.zeros(2, 3, 32, 32)).shape == (2, CLASSES)


@pytest.mark.parametrize("case,needle", [
    ("arch", "do not fit --arch resnet34: keys 96 missing (first: layer1.2.conv1.weight)"),
    ("classes", "have a 10-class head at fc.weight [10, 512], but resnet18 for this data's 3 "
                "classes needs [3, 512]: fine-tune the teacher on this dataset's classes first"),
    ("missing", "weights file"),
    ("garbage", "is unreadable"),
])
def test_bad_weights_one_line_exit_2_nothing_written(capsys, tree, tmp_path, case, needle):
    weights = tmp_path / "w.pth"
    if case == "classes":
        torch.save(resnet18_state(num_classes=10), weights)
    elif case == "garbage":
        weights.write_bytes(b"not a checkpoint")
    elif case != "missing":
        torch.save(resnet18_state(), weights)
    arch = "resnet34" if case == "arch" else "resnet18"
    code, out = cli(capsys, tree, tmp_path, "--arch", arch, "--weights", str(weights))
    assert code == 2, out.err
    assert needle in out.err and len(out.err.strip().splitlines()) == 1, out.err
    assert not (tmp_path / "out").exists()


def test_unexpected_key_named(tmp_path):
    state = dict(resnet18_state(), **{"extra.weight": torch.zeros(1)})
    with pytest.raises(TeacherError, match=r"1 unexpected \(first: extra.weight\)"):
        fit_weights(build_model("resnet18", CLASSES), state, "resnet18", "w.pth", prefix="")


def test_adapter_resizes_and_renormalises():
    half = ((0.5,) * 3, (0.5,) * 3)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    raw = torch.rand(2, 3, 8, 8)
    x = (raw - 0.5) / 0.5
    same = InputAdapter(8, half, 8, half)
    assert not same.needed and torch.equal(same(x), x)
    assert not InputAdapter(8, half, None, None).needed  # an old teacher file: nothing recorded
    out = InputAdapter(8, half, 16, imagenet)(x)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in imagenet)
    want = torch.nn.functional.interpolate((raw - mean) / std, size=(16, 16), mode="bilinear",
                                           align_corners=False)
    assert out.shape == (2, 3, 16, 16) and torch.allclose(out, want, atol=1e-5)


def test_teacher_at_own_size_keeps_layer_names(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", CLASSES)
    path = tmp_path / "t.pt"
    export_teacher(path, model, "resnet18", ["a", "b", "c"], 64, norm=((0.1,) * 3, (0.2,) * 3))
    teacher = load_teachers([str(path)], None, 32, ((0.5,) * 3, (0.5,) * 3))
    seen = []
    teacher.conv1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    x = torch.rand(2, 3, 32, 32)
    out = teacher(x)
    assert seen == [(2, 3, 64, 64)]  # the student's 32 px batch reached it at 64 px
    adapter = InputAdapter(32, ((0.5,) * 3, (0.5,) * 3), 64, ((0.1,) * 3, (0.2,) * 3))
    with torch.no_grad():
        assert torch.allclose(out, model.eval()(adapter(x)), atol=1e-5)
    assert "layer3" in dict(teacher.named_modules())  # feature methods hook the same names


def test_ensemble_is_the_weighted_mean(tmp_path):
    paths, models = [], []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(build_model("tiny_cnn", CLASSES).eval())
        paths.append(str(tmp_path / f"t{seed}.pt"))
        export_teacher(paths[-1], models[-1], "tiny_cnn", ["a", "b", "c"], 16)
    teacher = load_teachers(paths, [3, 1], 16, ((0.5,) * 3, (0.5,) * 3))
    assert isinstance(teacher, TeacherEnsemble)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        want = 0.75 * models[0](x) + 0.25 * models[1](x)
    assert torch.allclose(teacher(x), want, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_ensemble_classes_must_agree(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    export_teacher(a, build_model("tiny_cnn", 3), "tiny_cnn", ["cat", "dog", "fox"], 16)
    export_teacher(b, build_model("tiny_cnn", 3), "tiny_cnn", ["cat", "cow", "fox"], 16)
    with pytest.raises(TeacherError, match="class 1 is 'cow' there but 'dog' in"):
        load_teachers([str(a), str(b)], None, 16, ((0.5,) * 3, (0.5,) * 3))


def test_manifest_json_serialisable_teacher_info(tmp_path):
    path = tmp_path / "t.pt"
    export_teacher(path, build_model("tiny_cnn", 3), "tiny_cnn", ["a", "b", "c"], 16)
    json.dumps(read_teacher_info(path))  # no tensors outside the state dict
