"""export, eval, predict (and their bad input) on run folders trained here in plain PyTorch.

The runs are made by the same engine calls the Ray worker makes (train_one_epoch, evaluate,
epoch_metrics, checkpoints.save), in this process: a real run folder in a few seconds.
"""
import json
import shutil

import numpy as np
import pytest
import torch

from kd_ray.cli import main
from kd_ray.config import load_config
from kd_ray.data import build_data, write_synthetic_imagefolder
from kd_ray.deploy.evaluate import evaluate_target
from kd_ray.deploy.export import export, sample_batch
from kd_ray.deploy.loading import open_model
from kd_ray.deploy.predict import predict
from kd_ray.engine import build_optimizer, checkpoints, epoch_metrics, evaluate, make_loaders, train_one_epoch
from kd_ray.methods import TrainStep, build_method
from kd_ray.models import build_model, load_teacher
from kd_ray.runs.files import append_metrics
from kd_ray.runs.summary import summarize
from kd_ray.runs.stages import stage_method, stage_model


def train_run(cfg, stage, run_dir, epochs=2):
    """A run folder as the Ray worker leaves it, trained in this process (world size 1)."""
    torch.manual_seed(cfg.run.seed)
    bundle = build_data(cfg.data, stage, cfg.run.seed)
    train, sampler, val = make_loaders(bundle, cfg.optim.batch_size, 0, 1, cfg.run.seed, 0)
    student = build_model(stage_model(cfg, stage)[0], bundle.num_classes)
    teacher = load_teacher(cfg.distill.teacher_path)[0] if stage == "distill" else None
    step = TrainStep(student, build_method(cfg.distill, stage_method(cfg, stage)))
    optimizer, scheduler = build_optimizer(step, cfg.optim, len(train), epochs)
    history, device = [], torch.device("cpu")
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        sums = train_one_epoch(step, train, optimizer, epoch=epoch + 1, device=device,
                               teacher=teacher, scheduler=scheduler)
        metrics = epoch_metrics(sums, evaluate(student, val, device=device), bundle.num_classes)
        history.append({**metrics, "epoch": epoch + 1})
        state = {"model": student.state_dict(), "method": step.method.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch + 1, "stage": stage, "arch": stage_model(cfg, stage)[0],
                 "classes": bundle.classes, "image_size": bundle.image_size, "config": cfg.to_dict()}
        checkpoints.save(run_dir, state, history)
        append_metrics(run_dir, history[-1])  # as the driver's callback does
    cfg.save(run_dir / "config.yaml")
    return history


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 5-class PNG tree, a teacher run (teacher.pt) and a distill run from it.

    At 40 px the student's adaptive pooling (10 -> 5) exports with the TorchScript-based ONNX
    exporter; the teacher's (10 -> 3) needs the torch.export-based one: both paths are tested."""
    root = tmp_path_factory.mktemp("deploy")
    tree = write_synthetic_imagefolder(root / "tree", num_classes=5, per_class=(16, 8), image_size=40)
    base = ["data.name=imagefolder", f"data.root={tree}", "data.image_size=40", "optim.lr=0.05",
            "optim.batch_size=16", "model.teacher=simple_cnn", "model.student=tiny_cnn"]
    teacher_cfg = load_config(overrides=base)
    train_run(teacher_cfg, "teacher", root / "teacher", epochs=2)
    summarize(teacher_cfg, "teacher", root / "teacher")  # summary.json and teacher.pt
    cfg = load_config(overrides=base + [f"distill.teacher_path={root / 'teacher' / 'teacher.pt'}",
                                        "distill.loss=kd"])
    history = train_run(cfg, "distill", root / "distill", epochs=2)
    summarize(cfg, "distill", root / "distill")
    return {"root": root, "tree": tree, "distill": root / "distill", "teacher": root / "teacher",
            "history": history, "cfg": cfg}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_export_matches_pytorch_on_a_batch(runs, fmt, tmp_path):
    out = tmp_path / f"student.{fmt}"
    path, report = export(runs["distill"], fmt, out)
    assert path == out and out.is_file() and (tmp_path / f"{out.name}.json").is_file()
    assert not list(tmp_path.glob(".tmp_*"))
    reference = open_model(runs["distill"])
    exported = open_model(out)
    assert exported.classes == reference.classes == [f"class{c}" for c in range(5)]
    assert exported.meta["image_size"] == 40 and exported.meta["preprocess"]["mean"][0] == 0.485
    batch = sample_batch(reference, 7, seed=3)  # a batch size never used at export: dynamic axis
    np.testing.assert_allclose(exported.logits(batch), reference.logits(batch), atol=1e-4)
    if fmt != "safetensors":
        assert report["max_abs_diff"] < 1e-4
    side = json.loads((tmp_path / f"{out.name}.json").read_text())
    assert side["classes"] == reference.classes and side["arch"] == "tiny_cnn"


def test_onnx_metadata_props_carry_classes_size_and_normalisation(runs, tmp_path):
    import onnx

    path, _ = export(runs["distill"], "onnx", tmp_path / "m.onnx")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["classes"]) == [f"class{c}" for c in range(5)]
    assert props["image_size"] == "40" and json.loads(props["std"]) == [0.229, 0.224, 0.225]
    assert props["resize"] == "shorter_side_center_crop"


def test_export_of_the_teacher_and_default_path(runs):
    path, _ = export(runs["distill"], "onnx", which="teacher")
    assert path == runs["distill"] / "export" / "teacher.onnx"
    assert open_model(path).meta["arch"] == "simple_cnn"
    # a teacher.pt file exports beside itself; its preprocessing comes from its run's config
    path, _ = export(runs["teacher"] / "teacher.pt", "torchscript")
    assert path == runs["teacher"] / "export" / "teacher.pt"
    assert open_model(path).meta["preprocess"]["resize"] == "shorter_side_center_crop"


def test_onnx_mismatch_is_refused_and_nothing_is_left(runs, tmp_path, monkeypatch):
    import onnxruntime

    real = onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run",
                        lambda self, *a, **k: [real(self, *a, **k)[0] + 0.5])
    with pytest.raises(Exception, match="differs from PyTorch by 0.5"):
        export(runs["distill"], "onnx", tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_failing_both_exporters_names_both_errors(runs, tmp_path, monkeypatch):
    def refuse(*args, dynamo, **kwargs):
        raise (RuntimeError("dynamo says no\nadvice") if dynamo else ValueError("torchscript says no\nmore"))

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(Exception, match="^ONNX export of tiny_cnn failed: TorchScript exporter: torchscript "
                                        "says no; dynamo exporter: dynamo says no$"):
        export(runs["distill"], "onnx", tmp_path / "no.onnx")
    assert list(tmp_path.iterdir()) == []


def test_eval_equals_the_runs_last_validation_numbers(runs, tmp_path):
    metrics, folder, _ = evaluate_target(runs["distill"], out=tmp_path / "ev")
    last = runs["history"][-1]
    assert metrics["count"] == 40
    assert metrics["top1"] == last["val/top1"] and metrics["top5"] == last["val/top5"]
    assert metrics["loss"] == pytest.approx(last["val/loss"], rel=1e-5)
    assert sum(map(sum, metrics["confusion"])) == 40
    per_class = [a for a in metrics["per_class_top1"].values()]
    assert np.mean(per_class) == pytest.approx(metrics["top1"])  # 8 images in every class
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["teacher_agreement"] <= 1
    assert metrics["teacher_kl"] >= 0
    for name in ("metrics.json", "per_class.csv", "predictions.csv", "confusion.png", "reliability.png"):
        assert (folder / name).stat().st_size > 0


def test_fidelity_of_a_model_with_itself_is_perfect(runs):
    from kd_ray.deploy.evaluate import metrics_of

    logits = np.random.default_rng(0).standard_normal((50, 5))
    labels = np.arange(50) % 5
    m = metrics_of(logits, labels, [str(i) for i in range(5)], teacher=logits)
    assert m["teacher_agreement"] == 1.0 and m["teacher_kl"] == pytest.approx(0, abs=1e-12)


def test_ece_of_a_calibrated_and_an_overconfident_model():
    from kd_ray.deploy.evaluate import calibration

    labels = np.zeros(1000, dtype=int)
    probs = np.tile([0.7, 0.3], (1000, 1))
    labels[700:] = 1  # 70% confident, 70% right
    assert calibration(probs, labels)[0] == pytest.approx(0.0, abs=1e-9)
    labels[:] = 1  # 70% confident, never right
    assert calibration(probs, labels)[0] == pytest.approx(0.7)


def test_predict_on_png_folder_gives_evals_classes_onnx_and_run(runs, tmp_path):
    metrics, _, pred = evaluate_target(runs["distill"], out=tmp_path / "ev")
    classes = metrics["per_class_top1"].keys()
    val = sorted((runs["tree"] / "val").rglob("*.png"))  # ImageFolder's order: class, then name
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, path in enumerate(val):
        shutil.copy(path, folder / f"{i:03d}.png")
    expected = [list(classes)[p] for p in pred]
    onnx_file, _ = export(runs["distill"], "onnx", tmp_path / "s.onnx")
    for model in (onnx_file, runs["distill"]):
        rows, bad = predict(model, [folder], top_k=2)
        assert bad == [] and [r["top"][0][0] for r in rows] == expected
        assert all(abs(sum(p for _, p in r["top"]) - 1) < 1 or len(r["top"]) == 2 for r in rows)


def test_predict_reports_an_undecodable_image_and_classifies_the_rest(runs, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, path in enumerate(sorted((runs["tree"] / "val" / "class1").glob("*.png"))[:3]):
        shutil.copy(path, folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "p.json"
    code = main(["predict", str(runs["distill"]), str(folder), "--json", str(out), "-k", "2"])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot read image {folder / 'broken.png'}" in err
    data = json.loads(out.read_text())
    assert len(data["predictions"]) == 3 and data["unreadable"][0]["path"].endswith("broken.png")


def test_bad_inputs_are_one_line_exit_2(runs, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    other = tmp_path / "model.onnx"
    other.write_bytes(b"\x89PNG not a model")
    cases = [(["export", str(empty)], "holds no finished checkpoint"),
             (["predict", str(other), str(runs["tree"] / "val")], "is not a readable ONNX model"),
             (["eval", str(tmp_path / "x.h5")], "neither a file"),
             (["export", str(runs["tree"] / "val" / "class0" / "img000.png")], "unknown suffix"),
             (["export", str(runs["teacher"]), "--which", "teacher", "--format", "onnx",
               "--out", str(tmp_path / "t.onnx")], None)]
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err
        if message is None:
            assert code == 0
            continue
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty_run", "model.onnx", "t.onnx", "t.onnx.json"]


def test_bench_rows_for_a_run_an_onnx_file_and_an_architecture(runs, tmp_path, capsys):
    from kd_ray.deploy.bench import bench, count_macs

    # tiny_cnn at 40 px: conv 3->8 at 40x40, conv 8->16 at 20x20, linear 400->5 (multiply-adds)
    assert count_macs(open_model(runs["distill"]).module, 40) == 8 * 1600 * 27 + 16 * 400 * 72 + 400 * 5
    onnx_file, _ = export(runs["distill"], "onnx", tmp_path / "s.onnx")
    rows = bench(runs["distill"], batch=4, seconds=0.01) + bench(onnx_file, batch=4, seconds=0.01)
    assert [(r["runtime"], r["device"]) for r in rows] == [("pytorch", "cpu"), ("onnxruntime", "cpu"),
                                                           ("onnxruntime", "cpu")]
    assert len({(r["params"], r["macs"]) for r in rows}) == 1  # the ONNX file's arch is counted too
    assert all(r["p95_ms"] >= r["p50_ms"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert rows[-1]["size_mb"] == onnx_file.stat().st_size / 2**20
    assert main(["bench", "tiny_cnn", "--image-size", "40", "--num-classes", "3", "--seconds",
                 "0.01", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "| tiny_cnn | tiny_cnn | 40 |" in out


def test_comparison_gains_size_macs_latency_agreement_and_tradeoff_plot(runs, tmp_path):
    from kd_ray.runs.report import comparison_rows, find_runs, write_report

    found = find_runs([runs["teacher"], runs["distill"]])
    table = write_report(tmp_path, found)
    assert "| size MB | MACs | CPU ms (b1, 1 thread) | agreement with teacher % |" in table
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    import csv

    rows = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    teacher, student = rows
    assert teacher["agreement"] == "" and float(student["agreement"]) == pytest.approx(
        100 * evaluate_target(runs["distill"], out=tmp_path / "ev")[0]["teacher_agreement"])
    assert float(teacher["size_mb"]) > float(student["size_mb"]) > 0
    assert int(student["macs"]) == 8 * 1600 * 27 + 16 * 400 * 72 + 400 * 5
    assert float(student["cpu_ms"]) > 0
    assert comparison_rows(found)[0].get("cpu_ms") is None  # plain rows unless asked
    assert write_report(tmp_path, found) == table  # measured once: deploy.json in each run
    assert json.loads((runs["distill"] / "deploy.json").read_text())["cpu_ms"] == float(student["cpu_ms"])


def test_predict_with_an_onnx_file_imports_no_torch(runs, tmp_path):
    import subprocess
    import sys

    onnx_file, _ = export(runs["distill"], "onnx", tmp_path / "s.onnx")
    code = ("import sys; from kd_ray.cli import main; "
            f"code = main(['predict', {str(onnx_file)!r}, {str(runs['tree'] / 'val' / 'class2')!r}]); "
            "print('TORCH', 'torch' in sys.modules, 'kd_ray.models' in sys.modules); sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TORCH False False" in out.stdout and out.stdout.count(".png ") == 8  # one row per image


def test_predict_csv_has_one_row_per_image_with_top_k(runs, tmp_path, capsys):
    out = tmp_path / "p.csv"
    folder = runs["tree"] / "val" / "class4"
    assert main(["predict", str(runs["distill"]), str(folder), "--csv", str(out), "-k", "2"]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "path,top1_class,top1_prob,top2_class,top2_prob" and len(lines) == 9
    assert "img000.png" in capsys.readouterr().out


def test_image_files_get_the_tensor_datasets_own_transform(tmp_path):
    """An MNIST image saved as PNG and read back for predict is the val transform's tensor."""
    from PIL import Image

    from kd_ray.deploy.images import load_image, preprocess_spec
    from kd_ray.deploy.torch_models import data_is_pil

    cfg = load_config()  # mnist5k: uint8 images, so a PNG holds them exactly
    assert not data_is_pil(cfg.data)
    bundle = build_data(cfg.data, "student", 0)
    raw, _ = bundle.val.raw[0]
    Image.fromarray((raw[0].numpy() * 255).round().astype(np.uint8), "L").save(tmp_path / "d.png")
    got = load_image(tmp_path / "d.png", preprocess_spec(False, 28))
    np.testing.assert_allclose(got, bundle.val[0][0].numpy(), atol=1e-6)


def test_runs_of_one_architecture_share_one_latency(runs, tmp_path):
    from kd_ray.runs.report import find_runs, write_report

    copy = tmp_path / "distill-copy"
    shutil.copytree(runs["distill"], copy)
    (copy / "deploy.json").unlink(missing_ok=True)
    write_report(tmp_path / "out", find_runs([runs["distill"], copy]))
    ms = [json.loads((d / "deploy.json").read_text())["cpu_ms"] for d in (runs["distill"], copy)]
    assert ms[0] == ms[1] > 0
