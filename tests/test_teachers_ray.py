"""On Ray: a teacher brought from elsewhere, then distill (issue 12's "done when"); and compare
with an ensemble teacher and a teacher-assistant chain. Two TorchTrainer-heavy tests, in-process
on the session's Ray instance."""
import json

import torch
import torchvision

from kd_ray.cache.store import sha256_file
from kd_ray.cli import main
from kd_ray.data import write_synthetic_imagefolder
from kd_ray.models import build_model, export_teacher
from kd_ray.runs.files import read_history

import pytest


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    write_synthetic_imagefolder(root, num_classes=3, per_class=(16, 6), image_size=32)
    return root


def base_args(tree, tmp_path):
    return ["--set", "data.name=imagefolder", "--set", f"data.root={tree}", "--set", "data.image_size=32",
            "--set", "model.student=tiny_cnn", "--set", "optim.epochs=1", "--set", "optim.batch_size=16",
            "--set", f"run.storage={tmp_path / 'results'}"]


def imported_resnet18(tree, tmp_path) -> str:
    torch.manual_seed(0)
    weights = tmp_path / "resnet18_finetuned.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), weights)
    out = tmp_path / "imported" / "teacher.pt"
    code = main(["import-teacher", *base_args(tree, tmp_path), "--arch", "resnet18",
                 "--weights", str(weights), "--out", str(out), "--image-size", "48",
                 "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"])
    assert code == 0 and out.is_file()
    return str(out)


def test_import_teacher_then_distill_never_reads_teacher_epochs(ray_cluster, tree, tmp_path):
    teacher = imported_resnet18(tree, tmp_path)
    # optim.teacher_epochs=0 would stop any teacher stage: distill never consults it.
    code = main(["distill", *base_args(tree, tmp_path), "--set", f"distill.teacher_path={teacher}",
                 "--set", "optim.teacher_epochs=0", "--set", "run.num_workers=2", "--set", "run.name=d"])
    assert code == 0
    run = tmp_path / "results" / "d"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["teacher"] == teacher
    # The cache was built on Ray from the 48 px teacher fed the student's 32 px batches.
    manifest = json.loads((tmp_path / "results" / "teacher_cache" / "manifest.json").read_text())
    assert manifest["teacher_sha256"] == sha256_file(teacher) and manifest["rows"] == 48
    assert read_history(run)[0]["perf/teacher_images"] == 0
    assert main(["train-teacher", *base_args(tree, tmp_path), "--set", "optim.teacher_epochs=0"]) == 2


def test_compare_with_an_ensemble_and_an_assistant_chain(ray_cluster, tree, tmp_path, capsys):
    teacher = imported_resnet18(tree, tmp_path)
    torch.manual_seed(1)
    second = tmp_path / "second.pt"
    export_teacher(second, build_model("simple_cnn", 3), "simple_cnn", ["class0", "class1", "class2"], 32)
    code = main(["compare", *base_args(tree, tmp_path), "--methods", "kd", "mse_logits",
                 "--set", f"distill.teacher_path=[{teacher}, {second}]", "--set", "distill.teacher_weights=[2, 1]",
                 "--set", "model.assistants=[simple_cnn]", "--set", "data.labels_per_class=4",
                 "--set", "run.num_workers=1", "--set", "run.name=cmp"])
    assert code == 0
    root = tmp_path / "results" / "cmp"
    for run in ("student-seed0", "assistant1-simple_cnn", "distill-seed0", "distill-mse_logits-seed0",
                "distill-ta-seed0"):
        assert (root / run / "summary.json").is_file(), run
    assert (root / "assistant1-simple_cnn" / "teacher.pt").is_file()
    ta = json.loads((root / "distill-ta-seed0" / "summary.json").read_text())
    assert ta["teacher"] == str(root / "assistant1-simple_cnn" / "teacher.pt")
    comparison = (root / "comparison.md").read_text()
    for label in ("student, labels only", "assistant 1, distilled from the teacher",
                  "student, distilled (kd)", "student, distilled (mse_logits)",
                  "student, distilled via simple_cnn"):
        assert f"| {label} |" in comparison, comparison
    methods = (root / "methods.md").read_text()
    assert "| student, distilled (kd) | tiny_cnn | 1 |" in methods
    assert methods.count("| yes |") == 3  # kd, mse_logits and the chain's student read a cache
    rows = (root / "methods.csv").read_text().splitlines()
    assert rows[0].startswith("method,arch,runs,top1_mean,top1_std,test_mean,test_std,agreement_mean") and len(rows) == 4
    # One cache for the ensemble (both files fingerprinted), one for the assistant's logits.
    manifest = json.loads((tmp_path / "results" / "cmp" / "teacher_cache" / "manifest.json").read_text())
    assert [h for h, _ in manifest["teacher_sha256"]] == [sha256_file(teacher), sha256_file(second)]
    assert (root / "assistant1-simple_cnn" / "teacher_cache" / "manifest.json").is_file()
    assert "Methods (" in capsys.readouterr().out
