"""Comparison table and plot from run folders (made by hand here; the Ray tests use real runs)."""
import json

import pytest

from kd_ray.errors import KdRayError
from kd_ray.runs.report import comparison_rows, find_runs, markdown_table, write_report


def fake_run(root, name, stage, arch, accs, params=1000, speed=50.0):
    run = root / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(
        {"stage": stage, "arch": arch, "params": params, "images_per_s": speed,
         "final": {"val/top1": accs[-1]}}))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": i + 1, "val/top1": a}) + "\n" for i, a in enumerate(accs)))


@pytest.fixture
def pipeline_dir(tmp_path):
    fake_run(tmp_path, "teacher", "teacher", "big", [0.5, 0.9], params=10**6)
    fake_run(tmp_path, "student-seed0", "student", "small", [0.4, 0.70])
    fake_run(tmp_path, "student-seed1", "student", "small", [0.4, 0.80])
    fake_run(tmp_path, "distill-seed0", "distill", "small", [0.5, 0.85], speed=30.0)
    fake_run(tmp_path, "distill-seed1", "distill", "small", [0.6, 0.95], speed=40.0)
    return tmp_path


def test_rows_give_mean_and_spread_over_seeds(pipeline_dir):
    rows = comparison_rows(find_runs([pipeline_dir]))
    assert [r["model"] for r in rows] == ["teacher", "student, labels only", "student, distilled"]
    student, distilled = rows[1], rows[2]
    assert student["runs"] == 2 and student["top1_mean"] == pytest.approx(75.0)
    assert student["top1_std"] == pytest.approx(7.0710678, rel=1e-6)
    assert (distilled["top1_min"], distilled["top1_max"]) == (pytest.approx(85.0), pytest.approx(95.0))
    assert distilled["images_per_s"] == pytest.approx(35.0)
    table = markdown_table(rows)
    assert "| student, distilled | small | 2 | 90.00 ± 7.07 | 85.00–95.00 | 1,000 | 35 |" in table


def test_write_report_files(pipeline_dir):
    table = write_report(pipeline_dir, find_runs([pipeline_dir]))
    assert (pipeline_dir / "comparison.md").read_text().strip() == table
    assert (pipeline_dir / "comparison.csv").read_text().startswith("model,arch,runs,top1_mean")
    assert (pipeline_dir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_folder_without_runs_is_an_error(tmp_path):
    with pytest.raises(KdRayError, match="no finished runs"):
        find_runs([tmp_path])
