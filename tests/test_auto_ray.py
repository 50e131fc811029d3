"""`kd-ray auto` end to end on the session's Ray instance, tiny: teacher, cache, a 2-setting search,
2 paired seeds on the held-out test split, the verdict, and best.yaml rerun as its final run."""
import json

import yaml

from kd_ray.runs.files import read_history
from tests.test_tune_ray import kd_ray, kd_ray_here


def test_auto_searches_trains_paired_seeds_and_its_best_yaml_reruns_the_final_run(tmp_path, cli_env):
    config = tmp_path / "auto.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"name": "synthetic", "synthetic_size": 192, "image_size": 16, "labels_per_class": 3},
        "model": {"teacher": "simple_cnn", "student": "tiny_cnn"},
        "optim": {"epochs": 2, "teacher_epochs": 2, "batch_size": 32, "lr": 0.05},
        "run": {"name": "auto", "storage": str(tmp_path / "results"), "num_workers": 1},
    }))
    done = kd_ray(cli_env, "auto", "-c", config, "--methods", "kd", "dkd", "--budget", "2", "--seeds", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "results" / "auto"
    assert "**Verdict: " in done.stdout and "| labels only |" in done.stdout and "95%" in done.stdout
    chosen = json.loads((root / "search" / "chosen.json").read_text())
    assert chosen["trials"] == 2 and chosen["params"]["distill.loss"] in ("kd", "dkd")
    assert "test/top1" in (root / "search" / "summary.md").read_text().splitlines()[0]
    rows = (root / "verdict.csv").read_text().splitlines()
    assert rows[0].startswith("seed,labels_only_test_top1") and len(rows) == 6
    assert (root / "verdict.png").stat().st_size > 0 and (root / "verdict.md").is_file()
    finals = [json.loads((root / "final" / f"{kind}-seed{s}" / "summary.json").read_text())
              for kind in ("student", "distill") for s in (0, 1)]
    assert all("test/top1" in f["final"] and "val/top1" in f["final"] for f in finals)
    # The test split is held out of the teacher's and the students' training sets alike.
    teacher = json.loads((root / "teacher" / "summary.json").read_text())
    assert "test/top1" in teacher["final"]

    again = kd_ray_here("auto", "-c", config, "--methods", "kd", "dkd", "--budget", "2", "--seeds", "2")
    assert again.returncode == 0 and "search already finished" in again.stderr + again.stdout, again.stderr[-2000:]

    best = yaml.safe_load((root / "best.yaml").read_text())
    best["run"]["storage"] = str(tmp_path / "rerun")
    (tmp_path / "best.yaml").write_text(yaml.safe_dump(best))
    rerun = kd_ray_here("distill", "-c", tmp_path / "best.yaml")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    mine = read_history(tmp_path / "rerun" / best["run"]["name"])[-1]["test/top1"]
    assert abs(100 * mine - 100 * finals[2]["final"]["test/top1"]) <= 0.5
