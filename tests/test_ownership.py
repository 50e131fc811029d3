"""One owner per run folder, machine-sized local runs, names, Ctrl-C and the small refusals of
issue 16, without Ray (the chaos suite's T10-T14 run the same promises through Ray)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from kd_ray.cli import main
from kd_ray.config import load_config
from kd_ray.config.checks import check_machine
from kd_ray.engine import checkpoints
from kd_ray.errors import ConfigError, DataError, InUseError, KdRayError
from kd_ray.runs import lock as run_lock
from kd_ray.runs.files import RAY_SNAPSHOT, prune_checkpoints, read_history
from kd_ray.runs.lock import LOCK_FILE, RunLock, read_owner
from kd_ray.runs.report import find_runs
from kd_ray.runs.stages import preflight


@pytest.fixture
def other_process():
    """A live process of this host that is not us (the owner of someone else's lock)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def write_lock(folder, **owner):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "started": time.time(),
                                                **owner}))


def test_lock_names_its_owner_is_reentrant_and_goes_on_release(tmp_path):
    folder = tmp_path / "runs" / "twin"
    with RunLock(folder) as held:
        owner = read_owner(folder)
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with RunLock(folder):  # the CLI holds it, run_stage takes it again: no refusal
            pass
        assert (folder / LOCK_FILE).exists(), "the inner release must keep the outer lock"
        assert held.created
    assert not folder.exists(), "a run that wrote nothing leaves no empty folder"


def test_second_driver_is_refused_with_the_owner_and_the_fix(tmp_path, other_process):
    write_lock(tmp_path / "twin", pid=other_process)
    with pytest.raises(InUseError, match=f"in use by kd-ray PID {other_process} on "
                       f"{socket.gethostname()}.*wait for it to finish, or start a fresh run beside it with --new"):
        RunLock(tmp_path / "twin").acquire()
    assert read_owner(tmp_path / "twin")["pid"] == other_process  # untouched


def test_lock_of_a_dead_process_or_a_silent_host_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "a", pid=dead.pid)
    with RunLock(tmp_path / "a"):
        assert read_owner(tmp_path / "a")["pid"] == os.getpid()
    assert f"(process {dead.pid} on this host has ended); taking it over" in capsys.readouterr().out
    write_lock(tmp_path / "b", pid=1, host="elsewhere")
    old = time.time() - run_lock.STALE_S - 5
    os.utime(tmp_path / "b" / LOCK_FILE, (old, old))
    with RunLock(tmp_path / "b"):
        pass
    assert "no heartbeat for" in capsys.readouterr().out
    write_lock(tmp_path / "c", pid=1, host="elsewhere")  # fresh heartbeat: still its owner's
    with pytest.raises(InUseError, match="on elsewhere"):
        RunLock(tmp_path / "c").acquire()


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    with RunLock(tmp_path / "r"):
        path = tmp_path / "r" / LOCK_FILE
        os.utime(path, (0, 0))
        deadline = time.monotonic() + 30
        while path.stat().st_mtime == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # poll: the heartbeat thread touches the file every 0.05 s
        assert time.time() - path.stat().st_mtime < 5


def test_cli_refuses_a_second_driver_and_a_second_sweep_resume(capsys, tmp_path, other_process):
    write_lock(tmp_path / "twin", pid=other_process)
    code = main(["train-student", "--set", f"run.storage={tmp_path}", "--set", "run.name=twin"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and f"PID {other_process}" in err and "--new" in err
    write_lock(tmp_path / "sweep", pid=other_process)
    code = main(["tune", "--resume", str(tmp_path / "sweep")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"sweep {tmp_path / 'sweep'} is in use by kd-ray PID {other_process}" in err


def test_local_runs_are_sized_to_the_machine(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(overrides=["run.num_workers=64"])
    with pytest.raises(ConfigError, match=f"needs 64 CPUs but this machine has {os.cpu_count()}"):
        check_machine(cfg)
    gpus = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"this machine has {gpus} GPU"):
        check_machine(load_config(overrides=[f"run.num_workers={gpus + 1}", "run.use_gpu=true"]))
    check_machine(load_config(overrides=[f"run.num_workers={os.cpu_count()}"]))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster: its own check, after joining
    check_machine(cfg)


@pytest.mark.parametrize("name", ["..", ".", "a" * 201, "a/b"])
def test_run_names_no_folder_can_have_are_refused(name):
    with pytest.raises(ConfigError, match="run.name"):
        load_config(overrides=[f"run.name='{name}'"])


def test_non_ascii_run_names_keep_their_folder_and_give_ray_an_ascii_name(tmp_path):
    from kd_ray.cluster.stage import ray_names

    assert load_config(overrides=["run.name='run ä 1'"]).run.name == "run ä 1"
    assert ray_names("/s", "plain-name") == ("/s", "plain-name")
    assert ray_names("/s", "café") == ("/s/café", ".")  # Ray's folder is the run folder still


def test_empty_config_file_is_refused(capsys, tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert main(["train-student", "-c", str(tmp_path / "empty.yaml")]) == 2
    assert "empty.yaml is empty" in capsys.readouterr().err


def test_storage_that_cannot_be_a_folder_is_one_line_before_ray(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert main(["train-student", "--set", f"run.storage={tmp_path}/afile/runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a file, not a folder" in err


def test_preflight_resolves_image_size_once_for_cache_and_best_yaml():
    cfg = preflight(load_config(overrides=["data.name=synthetic", "model.student=tiny_cnn"]), "student")
    assert cfg.data.image_size is not None


def test_report_names_unfinished_runs(capsys, tmp_path):
    unfinished = tmp_path / "distill-seed0"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val/top1": 0.5}) + "\n")
    with pytest.raises(KdRayError, match="distill-seed0 is unfinished .1 epoch.s. logged.*rerun"):
        find_runs([unfinished])
    with pytest.raises(KdRayError, match="no finished runs under .*distill-seed0 is unfinished"):
        find_runs([tmp_path])
    done = tmp_path / "student-seed0"
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"stage": "student", "arch": "a", "params": 1,
                                                   "final": {"val/top1": 0.5}}))
    assert [r["dir"] for r in find_runs([tmp_path])] == [done]
    assert "skipping run" in capsys.readouterr().out


def test_convert_refuses_a_corrupt_image_and_names_skipped_files(capsys, tmp_path):
    from kd_ray.data.parquet import convert_imagefolder_to_parquet

    for split in ("train", "val"):
        (tmp_path / "src" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "src" / split / "cat" / "ok.png")
    (tmp_path / "src" / "train" / "cat" / "notes.txt").write_text("not an image")
    assert convert_imagefolder_to_parquet(tmp_path / "src", tmp_path / "out") == {"train": 1, "val": 1}
    assert "skipped 1 file(s) that are not images by their extension: cat/notes.txt" in capsys.readouterr().out
    (tmp_path / "src" / "val" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        convert_imagefolder_to_parquet(tmp_path / "src", tmp_path / "out2")
    assert not (tmp_path / "out2" / "val.parquet").exists()


def test_prune_keeps_the_newest_and_what_ray_lists(tmp_path):
    made = [checkpoints.save(tmp_path, {"epoch": e}, []) for e in range(1, 6)]
    (tmp_path / RAY_SNAPSHOT).write_text(json.dumps({"dirs": [made[0].name]}))
    removed = prune_checkpoints(tmp_path, 2, protect=made[1])
    assert sorted(removed) == [made[2]]
    assert sorted(checkpoints.folders(tmp_path)) == [made[0], made[1], made[3], made[4]]


def test_first_ctrl_c_asks_for_a_stop_the_second_stops_at_once(tmp_path, capsys):
    from kd_ray.cluster.stage import on_ctrl_c

    handler = on_ctrl_c(tmp_path / ".stop")
    handler(signal.SIGINT, None)
    assert (tmp_path / ".stop").exists() and "Ctrl-C again stops at once" in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGINT, None)


def test_rerun_of_a_run_finished_but_unsummarized_starts_no_workers(tmp_path, monkeypatch, capsys):
    from kd_ray.cluster import stage as stage_mod
    from kd_ray.models import build_model

    cfg = preflight(load_config(overrides=["data.name=synthetic", "model.student=tiny_cnn", "optim.epochs=2",
                                           f"run.storage={tmp_path}", "run.name=done"]), "student")
    run_dir = tmp_path / "done"
    rows = [{"epoch": e, "epochs": 2, "val/top1": 0.5, "perf/images_per_s": 10.0} for e in (1, 2)]
    state = {"model": build_model("tiny_cnn", 10).state_dict(), "epoch": 2, "arch": "tiny_cnn",
             "classes": [str(c) for c in range(10)], "stage": "student", "image_size": 16}
    from kd_ray.data import describe

    state["classes"] = describe(cfg.data).classes
    checkpoints.save(run_dir, state, rows)

    def no_ray(*_):
        raise AssertionError("Ray must not start for a finished run")

    monkeypatch.setattr(stage_mod, "ensure_ray", no_ray)
    result = stage_mod.run_stage(cfg, "student", checked=True)
    assert result.summary["epochs"] == 2 and [r["epoch"] for r in read_history(run_dir)] == [1, 2]
    assert "already finished 2 epochs" in capsys.readouterr().out
    assert not (run_dir / LOCK_FILE).exists()


def test_ray_that_does_not_start_is_one_line_exit_1(capsys, tmp_path, monkeypatch):
    from kd_ray.cluster import session

    def times_out(**_):
        raise TimeoutError("Timed out after 30 seconds while waiting for node to startup.\nmore")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(session, "start_local_ray", times_out)
    # As on a fresh driver, even when this test session's Ray instance is up; and that one is
    # not the failed start's to shut down.
    monkeypatch.setattr(session.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(session.ray, "shutdown", lambda: None)
    code = main(["train-student", "--set", "data.name=synthetic", "--set", "model.student=tiny_cnn",
                 "--set", "run.num_workers=1", "--set", f"run.storage={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0, err
    assert "local Ray instance did not start (TimeoutError: Timed out after 30 s" in err
    assert "retry when it is less busy" in err and not (tmp_path / "kd").exists()


def test_object_storage_is_not_locked_nor_made_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with RunLock("s3://bucket/runs/x"):
        pass
    assert not list(tmp_path.iterdir())
