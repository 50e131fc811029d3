import json

import pytest

from kd_ray.config import Config, load_config, read_args_file
from kd_ray.errors import ConfigError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_round_trip_through_dict():
    cfg = Config()
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "c.yaml", "optim:\n  lr: 0.1\n  epochs: 3\ndistill:\n  alpha: 0.5\n")
    cfg = load_config(path, ["optim.epochs=7", "run.seeds=[1, 2]", "data.augment=true"])
    assert cfg.optim.lr == 0.1 and cfg.optim.epochs == 7
    assert cfg.distill.alpha == 0.5 and cfg.run.seeds == [1, 2] and cfg.data.augment is True


def test_int_accepted_for_float_and_null_for_optional():
    cfg = load_config(overrides=["optim.lr=1", "data.image_size=null"])
    assert isinstance(cfg.optim.lr, float) and cfg.data.image_size is None


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*valid keys in optim: .*lr"):
        load_config(overrides=["optim.lrr=0.1"])


def test_unknown_section(tmp_path):
    path = write(tmp_path, "c.yaml", "trainer:\n  x: 1\n")
    with pytest.raises(ConfigError, match="unknown config section"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("distill.alpha=1.5", r"alpha must be in \[0, 1\]"),
    ("distill.alpha=-0.1", r"alpha must be in \[0, 1\]"),
    ("distill.temperature=0", "temperature must be > 0"),
    ("optim.epochs=0", "epochs must be a positive integer"),
    ("optim.epochs=two", "optim.epochs must be int"),
    ("optim.name=adam", "sgd or adamw"),
    ("run.name=a/b", "without '/'"),
    ("data.val_fraction=1.0", "val_fraction"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(overrides=[override])
    assert "\n" not in str(info.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["epochs=3"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "bad.yaml", "optim: [1, 2\n"))


def test_save_writes_resolved_config(tmp_path):
    cfg = load_config(overrides=["optim.epochs=4"])
    cfg.save(tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_replace_returns_checked_copy():
    cfg = Config()
    other = cfg.replace(run={"seed": 5})
    assert other.run.seed == 5 and cfg.run.seed == 0
    with pytest.raises(ConfigError):
        cfg.replace(distill={"alpha": 2.0})


ORIGINAL_FLAGS = {
    "train_teacher": True, "distill": True, "teacher_model": "resnet18",
    "student_model": "simple_cnn", "data_dir": "/data/imagenette", "train_data": "train",
    "val_data": "val", "image_size": 224, "num_classes": 10, "max_epochs": 12,
    "batch_size": 32, "learning_rate": 0.01, "momentum": 0.8, "num_workers": 4, "gpus": 2,
}


def test_args_file_maps_original_flags(tmp_path):
    path = write(tmp_path, "commandline_args.txt", json.dumps(ORIGINAL_FLAGS))
    cfg = load_config(args_file=path, overrides=["optim.epochs=3"])
    assert cfg.model.teacher == "resnet18" and cfg.model.student == "simple_cnn"
    assert cfg.data.name == "imagefolder" and cfg.data.root == "/data/imagenette"
    assert (cfg.data.image_size, cfg.data.num_classes, cfg.data.loader_workers) == (224, 10, 4)
    assert (cfg.optim.batch_size, cfg.optim.lr, cfg.optim.momentum) == (32, 0.01, 0.8)
    assert cfg.optim.epochs == 3  # --set wins over the args file
    assert cfg.run.num_workers == 2 and cfg.run.use_gpu is True
    assert read_args_file(path)[1] == {"train_teacher": True, "distill": True}


def test_args_file_rejects_unknown_flags(tmp_path):
    path = write(tmp_path, "args.txt", json.dumps({"max_epochs": 2, "dropout": 0.5}))
    with pytest.raises(ConfigError, match="unknown flag.*dropout"):
        load_config(args_file=path)


def test_paths_made_absolute_for_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["data.root=imgs", "distill.teacher_path=~/t.pt", "run.storage=s3://b/x"])
    out = cfg.with_absolute_paths()
    assert out.data.root == str(tmp_path / "imgs")
    assert out.distill.teacher_path.startswith("/") and out.distill.teacher_path.endswith("/t.pt")
    assert out.run.storage == "s3://b/x" and out.model.teacher_pretrained is None


def test_every_shipped_config_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    files = sorted(root.glob("*.yaml"))
    assert len(files) >= 3
    for path in files:
        load_config(path)
    load_config(args_file=root / "commandline_args.example.txt")
