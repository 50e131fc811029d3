"""Checkpoints, resume bookkeeping and the ranks' agreement on errors, without Ray."""
import json

import pytest
import torch

from kd_ray.cluster.callbacks import MetricsCallback
from kd_ray.cluster.stage import raise_returned_error
from kd_ray.engine import checkpoints
from kd_ray.errors import ConfigError, DataError, NonFiniteLossError, PeerFailedError
from kd_ray.runs.files import backfill, read_failures
from kd_ray.runs.stages import check_resume, failure_message, fresh_name
from kd_ray.testing import faults

import gloo
import two_ranks  # spawned ranks import only this (not Ray): each starts in ~2 s, not ~8


def logged_warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("[kd_ray] warning:")]


def state(epoch):
    return {"model": {"w": torch.full((64,), float(epoch))}, "epoch": epoch, "arch": "tiny_cnn",
            "classes": ["a", "b"], "stage": "student"}


def history(epochs):
    return [{"epoch": e, "epochs": 3, "train/loss": 1.0 / e, "val/top1": 0.1 * e} for e in epochs]


def test_save_is_atomic_and_checked_on_load(tmp_path):
    folder = checkpoints.save(tmp_path, state(1), history([1]))
    assert folder.name.startswith("checkpoint_2") and not list(tmp_path.glob(".tmp_*"))
    loaded, manifest = checkpoints.load(folder)
    assert loaded["epoch"] == 1 and manifest["history"] == history([1])
    path = folder / "state.pt"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(checkpoints.BadCheckpoint, match="truncated"):
        checkpoints.read_manifest(folder)


def test_latest_falls_back_to_the_previous_checkpoint_and_names_both(tmp_path, capsys):
    older = checkpoints.save(tmp_path, state(1), history([1]))
    newer = checkpoints.save(tmp_path, state(2), history([1, 2]))
    (tmp_path / ".tmp_checkpoint_9999").mkdir()  # a writer killed mid-write: never a candidate
    (tmp_path / "checkpoint_9999-half-copied").mkdir()  # no manifest: skipped too
    (newer / "state.pt").write_bytes(b"")
    folder, manifest, loaded = checkpoints.latest(tmp_path, with_state=True)
    warnings = logged_warnings(capsys)
    assert folder == older and manifest["epoch"] == 1 and loaded["epoch"] == 1
    assert len(warnings) == 2 and newer.name in warnings[1] and older.name in warnings[1]
    checkpoints.clean_partial(tmp_path)
    assert not (tmp_path / ".tmp_checkpoint_9999").exists()


def test_unloadable_state_of_the_right_size_is_caught_when_loading(tmp_path):
    older = checkpoints.save(tmp_path, state(1), [])
    newer = checkpoints.save(tmp_path, state(2), [])
    path = newer / "state.pt"
    path.write_bytes(b"\0" * path.stat().st_size)  # same size, garbage: only torch.load sees it
    assert checkpoints.latest(tmp_path)[0] == newer  # the driver's size check
    assert checkpoints.latest(tmp_path, with_state=True)[0] == older


def test_no_usable_checkpoint_starts_over_with_a_warning(tmp_path, capsys):
    only = checkpoints.save(tmp_path, state(1), [])
    (only / "manifest.json").write_text("{")
    assert checkpoints.latest(tmp_path) is None
    warnings = logged_warnings(capsys)
    assert only.name in warnings[0] and "epoch 1" in warnings[0]


def test_callback_writes_each_epoch_once_and_backfill_restores_lost_lines(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = MetricsCallback(str(tmp_path))
    for row in history([1, 2]):
        callback.after_report(None, [row], None)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n")  # driver died before epoch 2's line
    assert [r["epoch"] for r in backfill(tmp_path, history([1, 2]))] == [2]
    callback = MetricsCallback(str(tmp_path))  # a rerun's callback
    for row in history([2, 3]):  # epoch 2 trained again after a restart
        callback.after_report(None, [row], None)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(e.step for e in acc.Scalars("val/top1")) == [1, 2, 3]


def test_failures_are_logged_per_attempt_and_summed_up_in_one_line(tmp_path):
    from kd_ray.config import Config

    callback = MetricsCallback(str(tmp_path), tensorboard=False)
    for _ in range(3):
        callback.after_exception(None, {1: RuntimeError("boom\nchaos: injected"), 0: OSError("peer gone")})
    assert len(read_failures(tmp_path)) == 3
    message = failure_message(Config.from_dict({"run": {"max_failures": 2}}), tmp_path, 0, RuntimeError("x"))
    assert message == ("3 attempt(s) failed (run.max_failures=2); first error: "
                       "rank 0: OSError: peer gone")


def test_returned_worker_error_is_raised_as_its_own_type():
    with pytest.raises(DataError, match=r"x.png \(rank 1\)"):
        raise_returned_error({"error": "DataError", "message": "cannot read image x.png (rank 1)"})
    raise_returned_error(None)  # a normal end


def test_resume_refuses_a_checkpoint_of_other_classes_and_new_goes_beside(tmp_path):
    from kd_ray.config import load_config

    cfg = load_config(overrides=["data.name=synthetic", "data.num_classes=3", "model.student=tiny_cnn"])
    run = tmp_path / "run"
    checkpoints.save(run, {**state(2), "classes": ["class0", "class1", "class2"]}, history([1, 2]))
    assert check_resume(cfg, "student", run)["epoch"] == 2
    other = cfg.replace(data={"num_classes": 4})
    with pytest.raises(ConfigError, match="--new"):
        check_resume(other, "student", run)
    assert fresh_name(tmp_path, "run") == "run-2" and fresh_name(tmp_path, "fresh") == "fresh"


def test_fault_plan_is_checked(monkeypatch, tmp_path):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.from_env() is None
    monkeypatch.setenv(faults.ENV, json.dumps({"dir": str(tmp_path), "faults": [{"kind": "explode"}]}))
    with pytest.raises(ValueError, match="explode"):
        faults.from_env()


TWO_RANK_CASES = [((3, "data"), 1, 3), ((3, "data"), 4, 4), ((3, "nan"), 1, 4), ((0, "data"), 4, 0)]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """All cases in one pair of spawned gloo ranks (a spawn costs seconds; a case milliseconds)."""
    out = tmp_path_factory.mktemp("ranks")
    cases = [(bad, check_every) for bad, check_every, _ in TWO_RANK_CASES]
    gloo.spawn_two(two_ranks.run_rank, out, cases, str(out))
    return out


@pytest.mark.parametrize("case", range(len(TWO_RANK_CASES)))
def test_one_rank_failing_stops_both_at_the_same_step(two_rank_results, case):
    """Two gloo ranks with DDP: no rank is left waiting in the gradient all-reduce."""
    bad, _, steps = TWO_RANK_CASES[case]
    r0, r1 = (json.loads((two_rank_results / f"rank{r}-{case}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == steps  # both ran the same forward passes, then stopped
    assert r0["error"][0] == PeerFailedError.__name__
    if bad[1] == "data":
        assert r1["error"] == [DataError.__name__, f"cannot read image bad{bad[0]}.png"]
    else:
        assert r1["error"][0] == NonFiniteLossError.__name__ and "epoch 2 step 3" in r1["error"][1]
        assert "epoch 2 step 3" in r0["error"][1]


def test_callback_writes_epochs_whose_report_was_lost_from_the_checkpoint_history(tmp_path):
    """Rank 1 died right after epoch 1's checkpoint, before Ray took epoch 1's report."""
    folder = checkpoints.save(tmp_path, state(2), history([1, 2]))

    class Checkpoint:
        path = str(folder)

    callback = MetricsCallback(str(tmp_path), tensorboard=False)
    # The report itself has keys the checkpoint's history does not (an attempt's setup time).
    callback.after_report(None, [{**history([2])[0], "perf/setup_seconds": 1.5}], Checkpoint())
    callback.after_report(None, [history([3])[0]], None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r.get("perf/setup_seconds") for r in rows] == [None, 1.5, None]


class _Planted:
    """A pickle payload: unpickling it would create ``marker`` (it must never run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_payload_in_a_checkpoint_is_refused_not_run(tmp_path, capsys):
    older = checkpoints.save(tmp_path, state(1), history([1]))
    newer = checkpoints.save(tmp_path, state(2), history([1, 2]))
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(1)}, "optimizer": _Planted(marker)}, newer / "state.pt")
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["state_bytes"] = (newer / "state.pt").stat().st_size  # passes the size check
    (newer / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoints.BadCheckpoint) as caught:
        checkpoints.load(newer)
    message = str(caught.value)
    assert "refused" in message and "\n" not in message and len(message) < 400
    assert not marker.exists()
    folder, _, loaded = checkpoints.latest(tmp_path, with_state=True)  # the previous one is used
    assert folder == older and loaded["epoch"] == 1 and not marker.exists()
    assert "refused" in logged_warnings(capsys)[0]


def test_checkpoint_state_is_tensors_and_the_rest_is_json(tmp_path):
    full = {**state(3), "optimizer": {"state": {0: {"momentum_buffer": torch.ones(2)}},
                                      "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]},
            "config": {"run": {"name": "x"}}, "image_size": 16}
    folder = checkpoints.save(tmp_path, full, history([1, 2, 3]))
    raw = torch.load(folder / "state.pt", weights_only=True)
    assert set(raw) == {"model", "optimizer"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["config"] == {"run": {"name": "x"}} and manifest["classes"] == ["a", "b"]
    loaded, _ = checkpoints.load(folder)
    assert loaded["epoch"] == 3 and loaded["image_size"] == 16 and loaded["arch"] == "tiny_cnn"
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(loaded["model"]["w"], torch.full((64,), 3.0))
