"""A comparison with a failing row: every other run trains, the tables mark the failed row, the
command fails at the end, and a rerun trains only what failed. The stages are stood in for (no
Ray): each writes a real summary.json, so the report code runs for real."""
import json

import pytest

from kd_ray.cluster import pipeline
from kd_ray.cluster.stage import StageResult
from kd_ray.config import load_config
from kd_ray.errors import CollapseError, RunsFailedError


def fake_stages(monkeypatch, failing: set):
    trained = []

    def run_stage(cfg, stage, storage=None, name=None, **_):
        run_dir = pipeline.location(storage) / name
        summary_file = run_dir / "summary.json"
        if summary_file.is_file():  # finished: nothing to train (as the real run_stage says)
            return StageResult(stage, run_dir, json.loads(summary_file.read_text()))
        trained.append(name)
        if cfg.distill.loss in failing and stage == "distill":
            raise CollapseError(f"the student collapsed: 99% of the validation images got one class "
                                f"(seed {cfg.run.seed})")
        run_dir.mkdir(parents=True, exist_ok=True)
        top1 = {"student": 0.6, "distill": 0.8}[stage] + 0.01 * cfg.run.seed
        summary = {"stage": stage, "arch": "tiny_cnn", "params": 5000, "images_per_s": 100.0,
                   "seed": cfg.run.seed, "loss": cfg.distill.loss, "teacher_agreement": 0.9,
                   "final": {"val/top1": top1, "test/top1": top1 - 0.05}}
        summary_file.write_text(json.dumps(summary))
        (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val/top1": top1}) + "\n")
        return StageResult(stage, run_dir, summary)

    monkeypatch.setattr(pipeline, "run_stage", run_stage)
    monkeypatch.setattr(pipeline, "log_comparison", lambda *a, **k: None)
    return trained


def test_a_failing_method_is_a_marked_row_and_a_rerun_trains_only_it(tmp_path, monkeypatch):
    cfg = load_config(overrides=[f"run.storage={tmp_path}", "run.name=cmp", "run.seeds=[0, 1]",
                                 f"distill.teacher_path={tmp_path}/teacher.pt"])
    trained = fake_stages(monkeypatch, failing={"dkd"})
    with pytest.raises(RunsFailedError) as failed:
        pipeline.run_pipeline(cfg, train_teacher=False, checked=True, methods=["kd", "dkd"])
    assert sorted(trained) == ["distill-dkd-seed0", "distill-dkd-seed1", "distill-seed0", "distill-seed1",
                               "student-seed0", "student-seed1"]  # the others trained after each failure
    message = str(failed.value)
    assert "2 run(s) failed" in message and "distill-dkd-seed1: the student collapsed" in message
    root = tmp_path / "cmp"
    comparison = (root / "comparison.md").read_text()
    assert "| student, distilled (dkd) | - | 0 | - |" in comparison and "2: the student collapsed" in comparison
    assert "| student, distilled (kd) | tiny_cnn | 2 | 80.50 ± 0.71 |" in comparison
    assert "75.50 ± 0.71" in comparison  # test top-1 beside val
    methods = (root / "methods.md").read_text()
    assert "| student, distilled (dkd) | - | 0 |" in methods and "the student collapsed" in methods
    assert failed.value.table.startswith("| model |")
    assert json.loads((root / "distill-dkd-seed0" / "failed.json").read_text())["seed"] == 0

    # The cause is fixed: a rerun trains the two failed runs, nothing else.
    trained = fake_stages(monkeypatch, failing=set())
    pipeline.run_pipeline(cfg, train_teacher=False, checked=True, methods=["kd", "dkd"])
    assert sorted(trained) == ["distill-dkd-seed0", "distill-dkd-seed1"]
    assert not (root / "distill-dkd-seed0" / "failed.json").exists()
    assert "| student, distilled (dkd) | tiny_cnn | 2 |" in (root / "comparison.md").read_text()
