"""Teacher ensembles in the config and the cache, teacher-assistant chains and the methods
comparison, checked on the driver; sweeps over the method and its params. No Ray."""
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from kd_ray import cache as teacher_cache
from kd_ray.cli import main
from kd_ray.config import load_config, teacher_files
from kd_ray.config.sweep import apply_params
from kd_ray.data import build_data
from kd_ray.data.views import CachedViews
from kd_ray.errors import ConfigError
from kd_ray.models import build_model, export_teacher, load_teachers
from kd_ray.runs.methods_table import methods_markdown, method_rows, teacher_agreement
from kd_ray.runs.stages import check_pipeline, check_sweep, distill_run_name, method_config, preflight
from kd_ray.runs.summary import export_assistant, read_summary
from kd_ray.engine import checkpoints

CLASSES = [f"class{c}" for c in range(10)]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    import kd_ray.cluster.cache
    import kd_ray.cluster.stage
    import kd_ray.cluster.tune

    for module in (kd_ray.cluster.stage, kd_ray.cluster.tune, kd_ray.cluster.cache):
        monkeypatch.setattr(module, "ensure_ray", lambda *a, **k: pytest.fail("Ray started"))


def teachers(tmp_path, n=2, classes=CLASSES, size=16):
    paths = []
    for seed in range(n):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"teacher{seed}.pt"))
        export_teacher(paths[-1], build_model("simple_cnn", len(classes)), "simple_cnn", classes, size)
    return paths


def config(tmp_path, *extra):
    return load_config(overrides=["data.name=synthetic", "data.synthetic_size=40", "data.image_size=16",
                                  "distill.cache_batch_size=16", f"run.storage={tmp_path / 'r'}", *extra])


def test_teacher_path_takes_a_list_and_weights_are_checked(tmp_path):
    cfg = config(tmp_path, "distill.teacher_path=[a.pt, b.pt]", "distill.teacher_weights=[2, 1]")
    assert teacher_files(cfg.distill) == ["a.pt", "b.pt"]
    assert cfg.with_absolute_paths().distill.teacher_path == [str(Path("a.pt").resolve()),
                                                             str(Path("b.pt").resolve())]
    with pytest.raises(ConfigError, match="teacher_weights has 1 entries but distill.teacher_path names 2"):
        config(tmp_path, "distill.teacher_path=[a.pt, b.pt]", "distill.teacher_weights=[1]")
    with pytest.raises(ConfigError, match="positive sum"):
        config(tmp_path, "distill.teacher_path=[a.pt, b.pt]", "distill.teacher_weights=[0, 0]")
    with pytest.raises(ConfigError, match="a file or a list of files"):
        config(tmp_path, "distill.teacher_path=[a.pt, 3]")


def test_ensemble_cache_equals_the_live_weighted_mean_and_fingerprints_every_file(tmp_path):
    paths = teachers(tmp_path)
    cfg = config(tmp_path, f"distill.teacher_path=[{paths[0]}, {paths[1]}]", "distill.teacher_weights=[3, 1]")
    cfg = preflight(cfg, "distill")
    path = tmp_path / "cache"
    teacher_cache.build(cfg, path)
    data = build_data(cfg.data, "distill", 0)
    live = load_teachers(paths, [3, 1], 16, data.norm)
    views = CachedViews(data.train, teacher_cache.load(path), cfg.data.split_seed)
    images, _, cached = next(iter(DataLoader(views, batch_size=40)))
    with torch.no_grad():
        assert torch.allclose(cached.float(), live(images), atol=3e-3)
    want = teacher_cache.wanted(cfg)
    assert len(want["teacher_sha256"]) == 2 and want["teacher_sha256"][0][1] == 3.0
    assert teacher_cache.mismatch(teacher_cache.read_manifest(path), want) is None
    torch.manual_seed(9)  # the second teacher changes: the cache no longer fits
    export_teacher(paths[1], build_model("simple_cnn", 10), "simple_cnn", CLASSES, 16)
    reason = teacher_cache.mismatch(teacher_cache.read_manifest(path), teacher_cache.wanted(cfg))
    assert reason == "it was built for another teacher file (or ensemble)"


def test_ensemble_with_other_classes_stops_before_ray(tmp_path, capsys):
    a = teachers(tmp_path, 1)[0]
    other = CLASSES[:4] + ["wolf"] + CLASSES[5:]
    (tmp_path / "b").mkdir()
    b = teachers(tmp_path / "b", 1, classes=other)[0]
    code = main(["distill", "--set", "data.name=synthetic", "--set", "data.synthetic_size=40",
                 "--set", f"distill.teacher_path=[{a}, {b}]", "--set", f"run.storage={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "must share one class list" in err and "class 4 is 'wolf' there but 'class4'" in err
    assert not (tmp_path / "r").exists()


def test_teacher_epochs_zero_is_refused_only_when_a_teacher_trains(tmp_path):
    path = teachers(tmp_path, 1)[0]
    cfg = config(tmp_path, "optim.teacher_epochs=0", f"distill.teacher_path={path}")
    preflight(cfg, "distill")  # never consulted
    with pytest.raises(ConfigError, match="teacher_epochs=0 trains no teacher"):
        preflight(cfg, "teacher")
    with pytest.raises(ConfigError, match="teacher_epochs must be >= 1"):
        config(tmp_path, "optim.teacher_epochs=-1")


def test_compare_and_chain_inputs_are_checked_on_the_driver(tmp_path):
    path = teachers(tmp_path, 1)[0]
    cfg = config(tmp_path, f"distill.teacher_path={path}", "model.assistants=[simple_cnn]")
    check_pipeline(cfg, False, True, ["kd", "mse_logits", "ce"])
    with pytest.raises(ConfigError, match="unknown loss 'nope'"):
        check_pipeline(cfg, False, True, ["kd", "nope"])
    with pytest.raises(ConfigError, match="unknown model 'nonet'"):
        check_pipeline(cfg.replace(model={"assistants": ["nonet"]}), False, True)
    with pytest.raises(ConfigError, match="listed twice"):
        check_pipeline(cfg, False, True, ["kd", "kd"])
    with pytest.raises(ConfigError, match="model.assistants must be"):
        config(tmp_path, "model.assistants=resnet34")
    assert distill_run_name(cfg, "kd", 1) == "distill-seed1"
    assert distill_run_name(cfg, "tests.plugins:HeadedMSE", 0) == "distill-tests-plugins-HeadedMSE-seed0"


def test_each_compared_method_runs_with_its_own_params(tmp_path):
    path = teachers(tmp_path, 1)[0]
    cfg = config(tmp_path, f"distill.teacher_path={path}", "distill.loss=dkd", "distill.params.warmup=1",
                 "distill.method_params={dkd: {beta: 2, warmup: 5}, dist: {gamma: 3}}")
    check_pipeline(cfg, False, True, ["dkd", "dist", "kd"])
    assert method_config(cfg, "dkd").distill.params == {"beta": 2, "warmup": 1}  # params win
    assert method_config(cfg, "dist").distill.params == {"gamma": 3}
    assert method_config(cfg, "kd").distill.params == {}
    with pytest.raises(ConfigError, match="settings for dist, which is not among the methods run"):
        check_pipeline(cfg, False, True, ["dkd", "kd"])
    bad = cfg.replace(distill={"method_params": {"dist": {"gama": 3}}})
    with pytest.raises(ConfigError, match="gama"):
        check_pipeline(bad, False, True, ["dkd", "dist"])
    with pytest.raises(ConfigError, match="distill.method_params must map method names"):
        config(tmp_path, "distill.method_params={dkd: 2}")


def test_sweep_over_the_method_and_its_params(tmp_path):
    path = teachers(tmp_path, 1)[0]
    cfg = config(tmp_path, f"distill.teacher_path={path}", "distill.loss=tests.plugins:HeadedMSE",
                 "distill.params.weight=0.3",
                 "sweep.space={distill.params.weight: [0.1, 0.9], distill.temperature: [2, 4]}")
    check_sweep(cfg, False)
    trial = apply_params(cfg, {"distill.params.weight": 0.9, "distill.temperature": 2})
    assert trial.distill.params == {"weight": 0.9} and trial.distill.temperature == 2
    other = apply_params(cfg, {"distill.loss": "kd"})  # params belong to the config's method
    assert other.distill.loss == "kd" and other.distill.params == {}
    methods = cfg.replace(sweep={"space": {"distill.loss": ["kd", "mse_logits", "ce"]}})
    check_sweep(methods, False)
    bad = cfg.replace(sweep={"space": {"distill.params.wieght": [0.1]}})
    with pytest.raises(ConfigError, match="unknown distill.params key.*valid keys: weight"):
        check_sweep(bad, False)
    with pytest.raises(ConfigError, match="not a config key"):
        cfg.replace(sweep={"space": {"distill.params.a.b": [1]}})


def fake_run(folder, stage, arch, top1, cfg, label=None, **summary):
    """A finished run folder: a checkpoint of ``arch`` and its summary."""
    folder.mkdir(parents=True)
    torch.manual_seed(len(str(folder)))
    model = build_model(arch, 10)
    state = {"model": model.state_dict(), "epoch": 1, "arch": arch, "classes": CLASSES, "image_size": 16,
             "config": cfg.to_dict(), "stage": stage}
    checkpoints.save(folder, state, [{"epoch": 1, "val/top1": top1}])
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val/top1": top1}) + "\n")
    (folder / "summary.json").write_text(json.dumps(
        {"stage": stage, "arch": arch, "params": 1, "final": {"val/top1": top1}, "images_per_s": 100.0,
         **({"label": label} if label else {}), **summary}))
    return model


def test_methods_table_has_agreement_speed_and_cache(tmp_path):
    path = teachers(tmp_path, 1)[0]
    cfg = config(tmp_path, f"distill.teacher_path={path}")
    runs = []
    for seed, top1 in enumerate([0.5, 0.7]):
        fake_run(tmp_path / f"distill-seed{seed}", "distill", "tiny_cnn", top1, cfg,
                 "student, distilled (kd)", teacher_cache="/c")
    fake_run(tmp_path / "distill-ce-seed0", "distill", "tiny_cnn", 0.4, cfg,
             "student, distilled (ce)", teacher_cache="off")
    fake_run(tmp_path / "assistant1-simple_cnn", "distill", "simple_cnn", 0.9, cfg, role="assistant")
    from kd_ray.runs.report import find_runs

    runs = find_runs([tmp_path / "distill-seed0", tmp_path / "distill-seed1", tmp_path / "distill-ce-seed0",
                      tmp_path / "assistant1-simple_cnn"])
    rows = method_rows(runs, cfg)
    assert [r["method"] for r in rows] == ["student, distilled (kd)", "student, distilled (ce)"]
    kd = rows[0]
    assert kd["runs"] == 2 and kd["top1_mean"] == pytest.approx(60.0) and kd["cache"] == "yes"
    assert rows[1]["cache"] == "no"
    # Agreement is measured: the student's and the teacher's argmax on the validation images.
    data = build_data(cfg.data, "distill", 0)
    student = build_model("tiny_cnn", 10)
    student.load_state_dict(checkpoints.latest(tmp_path / "distill-seed0", with_state=True)[2]["model"])
    teacher = load_teachers([path], None, 16, data.norm)
    images = torch.stack([data.val[i][0] for i in range(len(data.val))])
    with torch.no_grad():
        want = (student.eval()(images).argmax(1) == teacher(images).argmax(1)).float().mean().item()
    assert read_summary(tmp_path / "distill-seed0")["teacher_agreement"] == pytest.approx(want)
    assert teacher_agreement(tmp_path / "distill-seed0", cfg) == pytest.approx(want)
    assert "| student, distilled (kd) | tiny_cnn | 2 | 60.00 ± 14.14 |" in methods_markdown(rows)


def test_an_assistant_exports_a_teacher_file(tmp_path):
    cfg = config(tmp_path)
    model = fake_run(tmp_path / "assistant1-simple_cnn", "distill", "simple_cnn", 0.9, cfg)
    path = export_assistant(tmp_path / "assistant1-simple_cnn")
    teacher = load_teachers([str(path)], None, 16, ((0.5,) * 3, (0.5,) * 3))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(teacher(x), model.eval()(x))


def test_submit_sends_an_ensemble_of_relative_files_to_the_head():
    import subprocess

    from kd_ray.cluster.submit import entrypoint

    line = entrypoint("distill", ["--set", "distill.teacher_path=[a/t.pt, /abs/u.pt]"], head_dir="/srv/kd")
    words = line.split(" ", 4)[4]
    out = subprocess.run(["sh", "-c", f"printf '%s\\n' {words}"], capture_output=True, text=True)
    assert "distill.teacher_path=[/srv/kd/a/t.pt, /abs/u.pt]" in out.stdout.splitlines()
