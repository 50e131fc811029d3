"""Probes of issue 24: bad input, bad files and signals give one line and an exit code, never a
traceback (no Ray: every case stops before it, or is the library function itself)."""
import json

import pytest

from kd_ray.cli import main
from kd_ray.runs.files import finished_summary


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


# ----- kd-ray report: a summary.json cut short ------------------------------------------------

def cut_summary(run):
    run.mkdir(parents=True)
    text = json.dumps({"stage": "student", "arch": "tiny_cnn", "epochs": 2, "final": {"val/top1": 0.5}})
    (run / "summary.json").write_text(text[:25])  # a driver killed while writing it
    return run / "summary.json"


@pytest.mark.parametrize("nested", [False, True], ids=["run", "pipeline"])
def test_report_of_a_cut_short_summary(capsys, tmp_path, nested):
    path = cut_summary(tmp_path / "pipe" / "seed0-student" if nested else tmp_path / "run")
    code, err = run_cli(capsys, "report", tmp_path / "pipe" if nested else path.parent)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("kd-ray: error: ") and str(path) in err
    assert "not valid JSON" in err and "rerun" in err and "delete" in err


def test_report_of_a_cut_short_metrics_file(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"stage": "student", "arch": "tiny_cnn", "epochs": 1,
                                                  "params": 1, "final": {"val/top1": 0.5}}))
    (run / "metrics.jsonl").write_text('{"epoch": 1, "val/top1": 0.5}\n{"epoch": 2, "val/t')
    code, err = run_cli(capsys, "report", run)
    assert code == 2 and len(err.splitlines()) == 1 and str(run / "metrics.jsonl") in err


def test_a_cut_short_summary_counts_as_unfinished(tmp_path):
    """The rerun the message asks for writes the summary again instead of failing to read it."""
    cut_summary(tmp_path / "run")
    assert finished_summary(tmp_path / "run", 2) is None


# ----- kd-ray export --out under a regular file --------------------------------------------

def test_export_out_under_a_regular_file(capsys, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    run = tmp_path / "run"
    run.mkdir()  # refused before the run is opened: it need not hold a checkpoint
    code, err = run_cli(capsys, "export", run, "--out", tmp_path / "afile" / "m.onnx")
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{tmp_path / 'afile'} is a file, not a folder" in err and "--out" in err


def test_export_out_that_is_a_folder(tmp_path):
    from kd_ray.deploy.export import export
    from kd_ray.errors import ModelFileError

    (tmp_path / "m.onnx").mkdir()
    with pytest.raises(ModelFileError, match="is a folder"):
        export(tmp_path, "onnx", tmp_path / "m.onnx")


# ----- YAML that does not parse: --set values and config files -------------------------------

def test_set_value_with_a_missing_bracket(capsys):
    code, err = run_cli(capsys, "train-student", "--set", "run.seeds=[0, 1")
    assert code == 2 and len(err.splitlines()) == 1
    assert "--set run.seeds=[0, 1" in err and "expected ',' or ']'" in err and "column 6" in err


def test_config_file_that_does_not_parse(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 0.1\nrun:\n  seeds: [0, 1\n")
    code, err = run_cli(capsys, "train-student", "-c", path)
    assert code == 2 and len(err.splitlines()) == 1
    assert str(path) in err and "line 4, column 10" in err and "expected ',' or ']'" in err


# ----- scientific notation is a float wherever a float is read ---------------------------------

def test_scientific_notation_in_set_and_config_file(tmp_path):
    from kd_ray.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 5e-4\n  lr: 1E-2\ndistill:\n  teacher_weights: [1e0, 2]\n"
                    "  teacher_path: [a.pt, b.pt]\nrun:\n  name: 1e3\n")
    cfg = load_config(path, ["optim.lr=1e-3", "optim.clip_grad_norm=+2.5e1"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clip_grad_norm) == (1e-3, 5e-4, 25.0)
    assert type(cfg.optim.lr) is float and cfg.distill.teacher_weights == [1.0, 2]
    assert cfg.run.name == "1e3"  # a text field keeps the text as written


def test_text_that_is_not_a_number_is_still_refused():
    from kd_ray.config import load_config
    from kd_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.lr must be float, got '1e-3x'"):
        load_config(overrides=["optim.lr=1e-3x"])
    with pytest.raises(ConfigError, match="optim.batch_size must be int"):
        load_config(overrides=["optim.batch_size=1e2"])  # an int field takes no float


def test_scientific_notation_in_method_params_and_sweep_space():
    from kd_ray.config import load_config
    from kd_ray.config.sweep import apply_params
    from kd_ray.methods import build_method

    cfg = load_config(overrides=["distill.loss=dkd", "distill.params.beta=8e0",
                                 "sweep.space={optim.lr: {loguniform: [1e-4, 1e-1]}, "
                                 "distill.params.alpha: [5e-1, 2E0]}"])
    assert build_method(cfg.distill).params.beta == 8.0
    assert cfg.sweep.space == {"optim.lr": {"loguniform": [1e-4, 0.1]}, "distill.params.alpha": [0.5, 2.0]}
    trial = apply_params(cfg, {"optim.lr": 3e-4, "distill.params.alpha": 0.5})
    assert trial.optim.lr == 3e-4 and build_method(trial.distill).params.alpha == 0.5


# ----- a dataset of one class -------------------------------------------------------------

def test_one_class_folder_is_refused_before_ray(capsys, tmp_path, no_ray):
    from kd_ray.data import write_synthetic_imagefolder

    root = write_synthetic_imagefolder(tmp_path / "tree", num_classes=1, per_class=(3, 2), image_size=16)
    code, err = run_cli(capsys, "train-teacher", "--set", "data.name=imagefolder", "--set",
                        f"data.root={root}", "--set", f"run.storage={tmp_path / 'runs'}")
    assert code == 2 and len(err.splitlines()) == 1
    assert "only class 'class0'" in err and "at least 2 classes" in err and f"{root}/train" in err


def test_one_synthetic_class_is_refused():
    from kd_ray.config import load_config
    from kd_ray.data import describe
    from kd_ray.errors import DataError

    with pytest.raises(DataError, match="at least 2 classes; set data.num_classes to 2 or more"):
        describe(load_config(overrides=["data.name=synthetic", "data.num_classes=1"]).data)
    assert len(describe(load_config(overrides=["data.name=synthetic", "data.num_classes=2"]).data).classes) == 2


# ----- data.image_size whose batches this machine cannot hold -----------------------------

def test_image_size_too_large_for_memory_is_refused_before_ray(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local instance: this machine's memory
    code, err = run_cli(capsys, "train-teacher", "--set", "data.image_size=100000",
                        "--set", f"run.storage={tmp_path}")
    assert code == 2 and len(err.splitlines()) == 1
    assert "data.image_size=100000" in err and "GiB of memory" in err and "lower data.image_size" in err


def test_batch_memory_bound(monkeypatch):
    from kd_ray.config import checks, load_config
    from kd_ray.errors import ConfigError

    monkeypatch.setattr(checks, "machine_memory", lambda: 2**30)
    # 16 images x 3 x 2048^2 x 4 bytes = 0.75 GiB per worker: one worker fits in 1 GiB, two do not
    one = load_config(overrides=["data.image_size=2048", "optim.batch_size=16", "run.num_workers=1"])
    checks.check_batch_memory(one)
    with pytest.raises(ConfigError, match=r"takes 0.8 GiB per worker \(x run.num_workers=2\)"):
        checks.check_batch_memory(one.replace(run={"num_workers": 2}))
    checks.check_batch_memory(one.replace(data={"image_size": None}))  # the dataset's own default


# ----- a decompression bomb is a bad image, not a crash to retry ---------------------------

@pytest.fixture
def bomb_tree(tmp_path, monkeypatch):
    """A 2-class tree of 40x40 PNGs (and its Parquet copy); then PIL's pixel limit lowered so
    that each image counts as a decompression bomb (above twice the limit: an error, not a warning)."""
    from PIL import Image

    from kd_ray.data import convert_imagefolder_to_parquet, write_synthetic_imagefolder

    root = write_synthetic_imagefolder(tmp_path / "tree", num_classes=2, per_class=(2, 1), image_size=40)
    convert_imagefolder_to_parquet(root, tmp_path / "parquet")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 40 * 40 = 1600 > 2 * 500
    assert not issubclass(Image.DecompressionBombError, OSError)  # why it needs its own clause
    return root, tmp_path / "parquet"


def test_decompression_bomb_in_the_train_split_is_a_data_error(bomb_tree):
    from kd_ray.config import load_config
    from kd_ray.data import load_source
    from kd_ray.data.sources import _load_rgb
    from kd_ray.errors import DataError

    folder, parquet = bomb_tree
    path = sorted((folder / "train" / "class0").glob("*.png"))[0]
    with pytest.raises(DataError, match=rf"cannot read image {path}: .*decompression bomb.*; delete or replace"):
        _load_rgb(str(path))
    for name, root in (("imagefolder", folder), ("parquet", parquet)):
        cfg = load_config(overrides=[f"data.name={name}", f"data.root={root}"])
        train, _ = load_source(cfg.data).open(40)
        with pytest.raises(DataError, match="cannot read image .*decompression bomb.*delete or replace"):
            train[0]


def test_decompression_bomb_in_predict_is_an_unreadable_file(bomb_tree):
    from kd_ray.deploy.images import load_images

    path = sorted((bomb_tree[0] / "val" / "class1").glob("*.png"))[0]
    spec = {"image_size": 40, "resize": "shorter_side_center_crop", "mean": [0.5] * 3, "std": [0.5] * 3}
    arrays, kept, bad = load_images([path], spec)
    assert not arrays and not kept and bad[0][0] == path and "decompression bomb" in bad[0][1]


# ----- teacher cache: a row file cut short or changed ----------------------------------------

@pytest.fixture
def built_cache(tmp_path):
    import torch

    from kd_ray import cache as teacher_cache
    from kd_ray.config import load_config
    from kd_ray.models import build_model, export_teacher

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    export_teacher(teacher, build_model("tiny_cnn", 4), "tiny_cnn", [f"class{c}" for c in range(4)], 16)
    cfg = load_config(overrides=["data.name=synthetic", "data.num_classes=4", "data.synthetic_size=16",
                                 "data.image_size=16", f"distill.teacher_path={teacher}",
                                 "run.num_workers=2", f"run.storage={tmp_path / 'runs'}"])
    path = tmp_path / "cache"
    teacher_cache.build(cfg, path)
    return cfg.replace(distill={"teacher_cache": str(path)}), path


def test_cache_manifest_records_each_row_file(built_cache):
    import zlib

    _, path = built_cache
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(files) == ["part-00000.logits.npy", "part-00001.logits.npy"]
    for name, sums in files.items():
        data = (path / name).read_bytes()
        assert sums == {"bytes": len(data), "crc32": zlib.crc32(data)}


def test_a_cut_short_row_file_is_one_line_not_up_to_date(built_cache, capsys):
    from kd_ray import cache as teacher_cache
    from kd_ray.errors import CacheError, KdRayError

    cfg, path = built_cache
    part = path / "part-00001.logits.npy"
    part.write_bytes(part.read_bytes()[:-10])  # a copy or a disk that lost the end
    message = rf"teacher cache row file {part} is \d+ bytes but \d+ were written .*rm -r {path}\) and rerun"
    with pytest.raises(CacheError, match=message):
        teacher_cache.resolve(cfg, path)  # the driver, before anything starts
    assert "up to date" not in capsys.readouterr().out
    with pytest.raises(CacheError, match=message):
        teacher_cache.load(path)  # a worker
    assert issubclass(CacheError, KdRayError)


def test_a_changed_row_file_fails_its_checksum(built_cache):
    from kd_ray import cache as teacher_cache
    from kd_ray.errors import CacheError

    cfg, path = built_cache
    part = path / "part-00000.logits.npy"
    data = bytearray(part.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    part.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"row file {part} does not match the checksum.*rm -r {path}"):
        teacher_cache.resolve(cfg, path)


def test_an_old_cache_without_sums_stays_readable_and_size_checked(built_cache, capsys):
    from kd_ray import cache as teacher_cache
    from kd_ray.errors import CacheError

    cfg, path = built_cache
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]  # as a build before this change wrote it
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert teacher_cache.resolve(cfg, path).distill.teacher_cache == str(path)
    assert "up to date" in capsys.readouterr().out
    assert teacher_cache.load(path).row(0, 0).shape == (4,)
    part = path / "part-00000.logits.npy"
    part.write_bytes(part.read_bytes()[:-2])  # the header still promises every row
    with pytest.raises(CacheError, match=f"row file {part} is"):
        teacher_cache.load(path)


# ----- a full disk while a checkpoint is written ---------------------------------------------

def test_full_disk_during_checkpoint_save(tmp_path, monkeypatch):
    import errno
    import shutil

    import torch

    from kd_ray.engine import checkpoints
    from kd_ray.errors import DiskFullError, KdRayError, one_line

    written = []

    def full(path, write):
        written.append(path)
        if path.name == checkpoints.STATE_FILE:
            path.write_bytes(b"partial")  # some bytes made it before the disk filled
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoints, "_write", full)
    seen = []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: seen.append(path) or shutil._ntuple_diskusage(
        10 * 2**30, 10 * 2**30 - 5 * 2**20, 5 * 2**20))
    state = {"model": {"w": torch.zeros(2)}, "epoch": 1}
    with pytest.raises(DiskFullError) as caught:
        checkpoints.save(tmp_path, state, [])
    line = one_line(caught.value)
    assert isinstance(caught.value, KdRayError) and len(line.splitlines()) == 1
    assert f"no space left on the disk of {tmp_path}" in line and "rerun the same command" in line
    assert "(5 MiB free)" in line and seen == [tmp_path]
    assert written and list(tmp_path.iterdir()) == []  # no .tmp_checkpoint_* left behind
    assert checkpoints.latest(tmp_path) is None


def test_other_write_errors_still_raise_and_leave_nothing(tmp_path, monkeypatch):
    import errno

    from kd_ray.engine import checkpoints

    def denied(path, write):
        raise OSError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpoints, "_write", denied)
    with pytest.raises(PermissionError):
        checkpoints.save(tmp_path, {"epoch": 1}, [])
    assert list(tmp_path.iterdir()) == []


# ----- SIGTERM is a stop, not a crash ----------------------------------------------------------

def test_sigterm_before_training_stops_with_143(capsys, monkeypatch):
    import os
    import signal

    from kd_ray import cli

    def run(args):
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before os.kill returns
        raise AssertionError("SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "run", run)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as in a fresh process
    code, err = run_cli(capsys, "train-student")
    assert code == 143 and err.splitlines()[-1] == f"kd-ray: {cli.TERMINATED} from the last checkpoint"
    assert signal.getsignal(signal.SIGTERM) is before  # main() puts the previous handler back


def test_first_sigterm_in_training_asks_for_a_stop_second_stops_at_once(capsys, monkeypatch, tmp_path):
    import os
    import signal

    from kd_ray import cli
    from kd_ray.cluster.stage import on_ctrl_c  # the stage's SIGINT handler during fit()
    from kd_ray.errors import RunInterrupted

    stop_file = tmp_path / ".stop"
    saved = signal.getsignal(signal.SIGINT)

    def run(args):
        signal.signal(signal.SIGINT, on_ctrl_c(stop_file))  # as _Trainer does in fit()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop_file.exists()  # the first: workers stop after this epoch's checkpoint
            if args.command == "distill":  # a second SIGTERM before the epoch ended
                os.kill(os.getpid(), signal.SIGTERM)
                raise AssertionError("the second SIGTERM did not stop at once")
        finally:
            signal.signal(signal.SIGINT, saved)
        raise RunInterrupted(f"stopped after epoch 1 of 3, checkpointed in {tmp_path}")

    monkeypatch.setattr(cli, "run", run)
    code, err = run_cli(capsys, "train-student")
    assert code == 143
    assert err.splitlines()[-1] == (f"kd-ray: stopped by SIGTERM; rerun the same command to resume "
                                    f"(stopped after epoch 1 of 3, checkpointed in {tmp_path})")
    stop_file.unlink()
    code, err = run_cli(capsys, "distill")
    assert code == 143 and err.splitlines()[-1].endswith("rerun the same command to resume from the last checkpoint")


def test_ctrl_c_still_exits_130(capsys, monkeypatch):
    from kd_ray import cli

    def run(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", run)
    code, err = run_cli(capsys, "train-student")
    assert code == 130 and err.splitlines()[-1] == f"kd-ray: {cli.INTERRUPTED} from the last checkpoint"


def test_ray_start_keeps_the_clis_sigterm_handler():
    import signal

    from kd_ray.cli import Sigterm
    from kd_ray.cluster.session import _start

    def init():  # what ray.init does to the driver's SIGTERM
        signal.signal(signal.SIGTERM, lambda signum, frame: None)

    with Sigterm().installed() as sigterm:
        _start("start", "fix", init)
        assert signal.getsignal(signal.SIGTERM) is sigterm


def test_sigint_handler_is_put_back_after_a_tune_fit():
    import signal

    from kd_ray.cluster.trial import fit_tuner

    class Tuner:  # Tune's fit() installs its SIGINT handler and leaves it in place
        def fit(self):
            signal.signal(signal.SIGINT, lambda *a: None)
            return "results"

    signal.signal(signal.SIGINT, signal.default_int_handler)
    assert fit_tuner(Tuner()) == "results"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_full_disk_under_torch_saves_own_runtime_error_is_still_a_full_disk(tmp_path, monkeypatch):
    """torch.save answers ENOSPC with "RuntimeError: unexpected pos" as its zip writer closes;
    the OSError is only that error's context (a real 400 KB tmpfs showed it: chaos T19)."""
    import errno

    from kd_ray.engine import checkpoints
    from kd_ray.errors import DiskFullError

    def full(path, write):
        path.write_bytes(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 359552 vs 359448")

    monkeypatch.setattr(checkpoints, "_write", full)
    with pytest.raises(DiskFullError, match="no space left on the disk of"):
        checkpoints.save(tmp_path, {"model": {}, "epoch": 1}, [])
    assert list(tmp_path.iterdir()) == []
