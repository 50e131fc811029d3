"""Bad method input (layer names, feature shapes, unknown methods or parameters) stops the CLI on
the driver before Ray starts: one line, exit 2, nothing written. And sweeps over distill.params.*."""
import subprocess
import sys

import pytest

from kd_ray.cli import main
from kd_ray.config import load_config
from kd_ray.config.sweep import apply_params, space_entry
from kd_ray.errors import ConfigError
from kd_ray.models import build_model, export_teacher
from kd_ray.runs.stages import check_sweep

CLASSES = ["class0", "class1", "class2"]


pytestmark = pytest.mark.usefixtures("no_ray")  # every error here comes before Ray


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    export_teacher(path, build_model("tiny_cnn", 3), "tiny_cnn", CLASSES, 32)
    return path


def args(tree, tmp_path, teacher, *sets):
    out = ["--set", "data.name=imagefolder", "--set", f"data.root={tree}", "--set", "model.student=tiny_cnn",
           "--set", "model.teacher=tiny_cnn", "--set", f"run.storage={tmp_path / 'runs'}"]
    if teacher:
        out += ["--set", f"distill.teacher_path={teacher}"]
    for item in sets:
        out += ["--set", item]
    return out


def refused(capsys, tmp_path, command, argv) -> str:
    code = main([command, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("kd-ray: error: ")
    assert not (tmp_path / "runs").exists()  # nothing written
    return err


@pytest.mark.parametrize("command, sets, needles", [
    ("distill", ["distill.loss=fitnets", "distill.params.student_layer=4", "distill.params.teacher_layer=44"],
     ["teacher layer '44' is not in Sequential", "nearest layer names: 4"]),
    ("distill", ["distill.loss=at", "distill.params.student_layers=[1, layer3]"],
     ["student layer 'layer3' is not in Sequential", "nearest layer names:"]),
    ("distill", ["distill.loss=fitnets", "distill.params.student_layer=1", "distill.params.teacher_layer=7"],
     ["student layer '1' (8x32x32)", "teacher layer '7' (400)", "pick another distill.params.teacher_layer",
      "teacher layers at 32x32: 0, 1"]),
    ("distill", ["distill.loss=at", "distill.params.student_layers=[4]", "distill.params.teacher_layers=[7]"],
     ["student layer '4' (16x16x16)", "teacher layer '7' (400)", "teacher layers at 16x16: 2, 3, 4"]),
    ("distill", ["distill.loss=fitnets"], ["fitnets needs distill.params.student_layer"]),
    ("distill", ["distill.loss=dkdd"], ["unknown loss 'dkdd'; choose one of: at, ce, crd, ctkd, dist, dkd, fitnets, kd, mlkd, mse_logits, reviewkd"]),
    ("distill", ["distill.loss=dist", "distill.params.gama=1"],
     ["unknown distill.params key(s) ['gama'] for distill.loss=dist; valid keys: beta, ce_weight, gamma"]),
    ("distill", ["distill.loss=dkd", "distill.params.beta=-2"], ["beta must be >= 0"]),
    ("distill", ["distill.loss=fitnets", "distill.params.student_layer=4", "distill.params.teacher_layer=4",
                 "distill.params.weights=2"], ["valid keys: student_layer, teacher_layer, weight"]),
    # The pipeline checks the distill stage against model.teacher before it trains anything.
    ("pipeline", ["distill.loss=fitnets", "distill.params.student_layer=4", "distill.params.teacher_layer=layer4"],
     ["teacher layer 'layer4' is not in Sequential"]),
    # Later cases go last, so the ids of the earlier ones (their index) stay as they were.
    ("distill", ["distill.loss=crd"], ["crd needs distill.params.student_layer"]),
    ("distill", ["distill.loss=reviewkd", "distill.params.student_layers=[4, 1]"],
     ["reviewkd fuses deep to shallow: student layer '1' (8x32x32) is larger than the layer before it, '4'"]),
    ("distill", ["distill.loss=crd", "distill.params.student_layer=7", "distill.params.teacher_layer=77"],
     ["teacher layer '77' is not in Sequential", "nearest layer names: 7"]),
    ("distill", ["distill.cache_encoding=topk", "distill.cache_top_k=1", "distill.temperature=4"],
     ["distill.cache_encoding=top-1 changes distill.loss=kd's loss by", "use distill.cache_encoding=float16"]),
])
def test_bad_method_input_stops_before_ray(capsys, tree, tmp_path, teacher, command, sets, needles):
    err = refused(capsys, tmp_path, command, args(tree, tmp_path, None if command == "pipeline" else teacher, *sets))
    for needle in needles:
        assert needle in err


def test_good_feature_settings_pass_the_driver_checks(tree, tmp_path, teacher):
    from kd_ray.runs.stages import preflight

    for sets in (["distill.loss=fitnets", "distill.params.student_layer=4", "distill.params.teacher_layer=4"],
                 ["distill.loss=at", "distill.params.student_layers=[1, 4]"],
                 ["distill.loss=crd", "distill.params.student_layer=7", "distill.params.teacher_layer=6"],
                 ["distill.loss=reviewkd", "distill.params.student_layers=[1, 4, 7]"],
                 ["distill.loss=dkd", "distill.params.standardize=true"]):
        cfg = load_config(None, args(tree, tmp_path, teacher, *sets)[1::2])
        preflight(cfg, "distill")
    assert not (tmp_path / "runs").exists()


def test_subprocess_layer_error_is_one_line_exit_2(tree, tmp_path, teacher):
    out = subprocess.run([sys.executable, "-m", "kd_ray.cli", "distill",
                          *args(tree, tmp_path, teacher, "distill.loss=fitnets", "distill.params.student_layer=5",
                                "distill.params.teacher_layer=55")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "teacher layer '55' is not in Sequential; nearest layer names: 5" in out.stderr
    assert "ray" not in out.stdout.lower() and not (tmp_path / "runs").exists()


# ----- sweeping a method's own parameters ---------------------------------------------------------

def test_a_sweep_space_can_name_distill_params(tree, tmp_path, teacher):
    assert space_entry("distill.params.beta", [1, 8]) == ("distill", "params.beta", "grid", [1, 8])
    for bad in ("distill.params.a.b", "optim.params.beta", "distill.param.beta"):
        with pytest.raises(ConfigError, match="not a config key"):
            space_entry(bad, [1])
    cfg = load_config(None, args(tree, tmp_path, teacher, "distill.loss=dkd", "distill.params.alpha=0.5",
                                 "sweep.space={distill.params.beta: [1, 8], distill.temperature: [2, 4]}")[1::2])
    trial = apply_params(cfg, {"distill.params.beta": 8, "distill.temperature": 2})
    assert trial.distill.params == {"alpha": 0.5, "beta": 8} and trial.distill.temperature == 2.0
    assert cfg.distill.params == {"alpha": 0.5}  # the base config is not changed
    check_sweep(cfg, train_teacher=False)


def test_a_sweep_over_a_temperature_a_lossy_cache_cannot_bear_is_refused(capsys, tree, tmp_path, teacher):
    """Top-1 of 3 classes moves kd's loss by 0.2% at T 0.5 (the run's T: passes) and by 53% at T 8:
    each trial's temperature is checked."""
    err = refused(capsys, tmp_path, "tune", args(tree, tmp_path, teacher, "distill.cache_top_k=1",
                                                 "distill.temperature=0.5",
                                                 "sweep.space={distill.temperature: [0.5, 8]}"))
    assert "distill.cache_encoding=top-1 changes distill.loss=kd's loss by" in err and "T=8" in err


@pytest.mark.parametrize("space, needle", [
    ("{distill.params.beta: [1, 8]}", "unknown distill.params key(s) ['beta'] for distill.loss=kd; valid keys: standardize"),
    ("{distill.params.beta: {uniform: [-1, 1]}}", "beta must be >= 0"),
])
def test_a_bad_params_sweep_is_refused_before_ray(capsys, tree, tmp_path, teacher, space, needle):
    loss = "kd" if "standardize" in needle else "dkd"
    err = refused(capsys, tmp_path, "tune", args(tree, tmp_path, teacher, f"distill.loss={loss}", f"sweep.space={space}"))
    assert needle in err
