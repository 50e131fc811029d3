"""Bad input stops on the driver with a one-line error and exit code 2, before Ray starts."""
import shutil
import subprocess
import sys

import pytest

from kd_ray.cli import main
from kd_ray.models import build_model, export_teacher


pytestmark = pytest.mark.usefixtures("no_ray")  # every error here comes before Ray


def teacher_file(tmp_path, classes):
    path = tmp_path / "teacher.pt"
    export_teacher(path, build_model("tiny_cnn", len(classes)), "tiny_cnn", classes, 32)
    return path


def run_cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def folder_args(root, *extra):
    return ["--set", "data.name=imagefolder", "--set", f"data.root={root}", *extra]


def test_missing_data_root(capsys, tmp_path):
    code, err = run_cli(capsys, "train-student", *folder_args(tmp_path / "nowhere"))
    assert code == 2 and "nowhere" in err and "data.root" in err and len(err.splitlines()) == 1


def test_missing_split(capsys, tree, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tree, root)
    shutil.rmtree(root / "val")
    code, err = run_cli(capsys, "train-teacher", *folder_args(root))
    assert code == 2 and "val" in err and len(err.splitlines()) == 1


def test_empty_class_folder(capsys, tree, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tree, root)
    for image in (root / "train" / "class1").iterdir():
        image.unlink()
    code, err = run_cli(capsys, "train-student", *folder_args(root))
    assert code == 2 and "class1" in err and len(err.splitlines()) == 1


def test_wrong_class_count(capsys, tree):
    code, err = run_cli(capsys, "train-student", *folder_args(tree, "--set", "data.num_classes=10"))
    assert code == 2 and "data.num_classes=10" in err and "3 classes" in err


def test_teacher_file_missing(capsys, tree, tmp_path):
    code, err = run_cli(capsys, "distill", *folder_args(tree, "--set", f"distill.teacher_path={tmp_path}/t.pt"))
    assert code == 2 and "t.pt" in err and "train-teacher" in err


def test_distill_without_teacher(capsys, tree):
    code, err = run_cli(capsys, "distill", *folder_args(tree))
    assert code == 2 and "distill.teacher_path" in err


@pytest.mark.parametrize("classes", [[str(i) for i in range(10)], ["class0", "class1", "other"]])
def test_teacher_classes_differ(capsys, tree, tmp_path, classes):
    path = teacher_file(tmp_path, classes)
    code, err = run_cli(capsys, "distill", *folder_args(tree, "--set", f"distill.teacher_path={path}"))
    assert code == 2 and "teacher" in err and "distill.teacher_path" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("override, needle", [
    ("model.student=resnet9000", "unknown model 'resnet9000'"),
    ("distill.loss=fancy", "unknown loss 'fancy'"),
    ("data.name=cifar", "unknown dataset 'cifar'"),
    ("distill.alpha=2", "alpha must be in [0, 1]"),
    ("distill.temperature=-1", "temperature must be > 0"),
    ("distill.loss=nope.module:fn", "cannot import 'nope.module'"),
])
def test_unknown_names_and_bad_values(capsys, tree, tmp_path, override, needle):
    path = teacher_file(tmp_path, ["class0", "class1", "class2"])
    code, err = run_cli(capsys, "distill", *folder_args(tree, "--set", f"distill.teacher_path={path}",
                                                         "--set", override))
    assert code == 2 and needle in err and len(err.splitlines()) == 1


def test_pipeline_checks_every_stage_before_training(capsys, tree):
    code, err = run_cli(capsys, "pipeline", *folder_args(tree, "--set", "model.student=nonet"))
    assert code == 2 and "unknown model 'nonet'" in err


def test_missing_pretrained_weights(capsys, tree, tmp_path):
    code, err = run_cli(capsys, "train-teacher",
                        *folder_args(tree, "--set", f"model.teacher_pretrained={tmp_path}/w.pth"))
    assert code == 2 and "w.pth" in err and "not found" in err


def test_subprocess_exit_code_and_single_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kd_ray.cli", "train-student", "--set", "optim.lr=-1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "kd-ray: error: optim.lr must be > 0, got -1.0"


SYNTHETIC = ["--set", "data.name=synthetic", "--set", "model.teacher=tiny_cnn"]


@pytest.mark.parametrize("space, message", [
    (None, "sweep.space is empty"),
    ("{distill.temprature: [1, 2]}", "'distill.temprature' is not a config key"),
    ("{distill.alpha: [0.5, 1.5]}", "distill.alpha"),
    ("{distill.alpha: {between: [0, 1]}}", "must be a list of values or one of"),
])
def test_tune_bad_search_space(capsys, tmp_path, space, message):
    extra = ["--set", f"sweep.space={space}"] if space else []
    code, err = run_cli(capsys, "tune", *SYNTHETIC, "--train-teacher", *extra)
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_tune_refuses_to_overwrite_a_sweep_and_resume_needs_one(capsys, tmp_path):
    (tmp_path / "sw" / "tune").mkdir(parents=True)
    code, err = run_cli(capsys, "tune", *SYNTHETIC, "--train-teacher", "--set", f"run.storage={tmp_path}",
                        "--set", "run.name=sw", "--set", "sweep.space={distill.alpha: [0.5]}")
    assert code == 2 and f"kd-ray tune --resume {tmp_path / 'sw'}" in err
    code, err = run_cli(capsys, "tune", "--resume", str(tmp_path / "nowhere"))
    assert code == 2 and "holds no sweep to resume" in err
    code, err = run_cli(capsys, "tune", "--resume", str(tmp_path / "sw"), "-c", "x.yaml")
    assert code == 2 and "--resume takes only the sweep folder" in err
