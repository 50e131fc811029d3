"""run.tracker=mlflow: the config keys, the driver-side checks (before Ray), the MLflow writer;
and, on the session's Ray instance, a distill run (resumed once) and a 2-trial sweep read back
through MlflowClient."""
import socket

import pytest
from mlflow.tracking import MlflowClient

from kd_ray.config import load_config
from kd_ray.data import describe
from kd_ray.errors import ConfigError
from kd_ray.models import build_model, export_teacher
from kd_ray.runs.stages import preflight
from kd_ray.runs.tracking import (RUN_ID_FILE, StageTracker, check_tracker, flatten, tracking_uri)


def tiny(tmp_path, *extra):
    return load_config(overrides=[
        "data.name=synthetic", "data.synthetic_size=128", "data.image_size=16",
        "model.teacher=tiny_cnn", "model.student=tiny_cnn", f"run.storage={tmp_path / 'results'}",
        "run.num_workers=1", "optim.batch_size=32", "optim.epochs=2", "run.tracker=mlflow", *extra])


def test_tracker_keys_default_to_tensorboard_and_a_local_mlruns_under_storage(tmp_path):
    cfg = load_config(overrides=[f"run.storage={tmp_path}"])
    assert (cfg.run.tracker, cfg.run.tracking_uri) == ("tensorboard", None)
    check_tracker(cfg)  # tensorboard: nothing to check
    assert tracking_uri(cfg) == (tmp_path / "mlruns").as_uri()
    folder = load_config(overrides=[f"run.tracking_uri={tmp_path / 'store'}"])
    assert tracking_uri(folder) == (tmp_path / "store").as_uri()
    with pytest.raises(ConfigError, match="run.tracker must be tensorboard or mlflow"):
        load_config(overrides=["run.tracker=wandb"])


def test_unreachable_tracking_server_is_refused_before_ray(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = tiny(tmp_path, f"run.tracking_uri=http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=f"run.tracking_uri http://127.0.0.1:{port} is unreachable"):
        preflight(cfg, "student")
    assert not (tmp_path / "results").exists()  # nothing half-written


def test_unwritable_file_store_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = tiny(tmp_path, f"run.tracking_uri={(blocker / 'mlruns').as_uri()}")
    with pytest.raises(ConfigError, match="is not a writable folder"):
        check_tracker(cfg)


def test_unreachable_uri_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "kd_ray.cli", "train-student", "--set",
                           "data.name=synthetic", "--set", f"run.storage={tmp_path}", "--set",
                           "run.tracker=mlflow", "--set", "run.tracking_uri=http://127.0.0.1:1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "unreachable" in line]
    assert len(errors) == 1 and "http://127.0.0.1:1" in errors[0]
    assert "Traceback" not in done.stderr


def test_flatten_makes_dotted_string_params():
    assert flatten({"optim": {"lr": 0.1, "name": "sgd"}, "model": {"assistants": []}}) == {
        "optim.lr": "0.1", "optim.name": "sgd", "model.assistants": "[]"}


def test_stage_tracker_logs_epochs_and_resumes_the_same_run(tmp_path):
    uri, run_dir = (tmp_path / "mlruns").as_uri(), tmp_path / "run"
    first = StageTracker(uri, "exp", run_dir, {"optim.lr": "0.1"})
    first.log_epoch({"epoch": 1, "val/top1": 0.5, "flag": True, "note": "x"})
    again = StageTracker(uri, "exp", run_dir, {"optim.lr": "0.1"})  # a rerun of the same folder
    again.log_epoch({"epoch": 2, "val/top1": 0.75})
    again.finish({"epochs": 2})
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [(run_dir / RUN_ID_FILE).read_text()]
    run = runs[0]
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.1"} and set(run.data.metrics) == {"val/top1"}
    history = client.get_metric_history(run.info.run_id, "val/top1")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.json"]


def test_stage_run_and_sweep_log_to_a_local_mlflow_store(ray_cluster, tmp_path):
    from kd_ray.cluster.stage import run_stage
    from kd_ray.cluster.tune import run_sweep

    uri = (tmp_path / "mlruns").as_uri()
    teacher = tmp_path / "teacher.pt"  # untrained: only the logged params and metrics matter here
    info = describe(tiny(tmp_path).data)
    export_teacher(teacher, build_model("tiny_cnn", len(info.classes)), "tiny_cnn", info.classes,
                   info.image_size)
    # A distillation: 2 epochs, then a rerun with 3 that resumes into the same MLflow run.
    stu = ("run.name=stu", f"run.tracking_uri={uri}", f"distill.teacher_path={teacher}",
           "distill.teacher_cache=off", "distill.temperature=3")
    result = run_stage(tiny(tmp_path, *stu), "distill")
    run_stage(tiny(tmp_path, *stu, "optim.epochs=3"), "distill")
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("stu").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == (result.run_dir / RUN_ID_FILE).read_text()
    run = runs[0]
    assert run.info.run_name == "stu" and run.info.status == "FINISHED"
    # Params are those of the run's first start (MLflow keeps a param's first value).
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["optim.epochs"] == "2"
    assert run.data.params["distill.loss"] == "kd" and run.data.params["distill.temperature"] == "3.0"
    history = client.get_metric_history(run.info.run_id, "val/top1")
    assert [m.step for m in history] == [1, 2, 3]
    assert "summary.json" in [a.path for a in client.list_artifacts(run.info.run_id)]

    # A 2-trial sweep: Ray's MLflow logger, one MLflow run per trial in the sweep's experiment.
    sweep = tiny(tmp_path, "run.name=sw", f"run.tracking_uri={uri}", "distill.loss=ce",
                 "sweep.space={optim.lr: [0.05, 0.1]}")
    run_sweep(sweep)
    trials = client.search_runs([client.get_experiment_by_name("sw").experiment_id])
    assert sorted(r.data.params["optim.lr"] for r in trials) == ["0.05", "0.1"]
    for trial in trials:
        assert trial.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val/top1")]
        assert steps == [1, 2]


def test_pipeline_comparison_goes_to_a_run_named_like_the_pipeline(tmp_path):
    from kd_ray.runs.tracking import log_comparison

    root = tmp_path / "results" / "pipe"
    root.mkdir(parents=True)
    (root / "comparison.md").write_text("| run | top1 |\n")
    (root / "comparison.csv").write_text("run,top1\n")
    cfg = tiny(tmp_path, "run.name=pipe")
    log_comparison(cfg, root, ["comparison.md", "comparison.csv", "tradeoff.png"])  # no plot here
    client = MlflowClient(tracking_uri(cfg))
    [run] = client.search_runs([client.get_experiment_by_name("pipe").experiment_id])
    assert run.info.run_name == "pipe" and run.data.params["run.name"] == "pipe"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["comparison.csv",
                                                                            "comparison.md"]
    assert (root / RUN_ID_FILE).read_text() == run.info.run_id


def test_an_export_of_a_tracked_run_becomes_an_artifact_of_its_mlflow_run(tmp_path):
    from kd_ray.runs.tracking import log_export

    cfg = tiny(tmp_path, "run.name=stu")
    run_dir = tmp_path / "results" / "stu"
    (run_dir / "export").mkdir(parents=True)
    cfg.save(run_dir / "config.yaml")
    tracker = StageTracker(tracking_uri(cfg), "stu", run_dir, {})
    tracker.finish({"epochs": 1})
    (run_dir / "export" / "student.onnx").write_bytes(b"onnx")
    (run_dir / "export" / "student.onnx.json").write_text("{}")
    assert log_export(run_dir) == ["student.onnx", "student.onnx.json"]
    client = MlflowClient(tracking_uri(cfg))
    logged = client.list_artifacts((run_dir / RUN_ID_FILE).read_text(), "export")
    assert sorted(a.path for a in logged) == ["export/student.onnx", "export/student.onnx.json"]
    untracked = tmp_path / "plain"
    untracked.mkdir()
    assert log_export(untracked) == []  # no MLflow run: nothing to do


def test_mlflow_tracker_without_the_extra_names_the_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow"
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs MLflow: pip install 'kd_ray\[mlflow\]'"):
        check_tracker(tiny(tmp_path))
