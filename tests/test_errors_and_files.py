"""Errors across Ray's wrappers and processes, and the run files' readers; no Ray instance."""
import pytest
from torch.utils.data import DataLoader, Dataset

from kd_ray.cluster.stage import raise_user_error
from kd_ray.errors import (ConfigError, DataError, KdRayError, NonFiniteLossError, first_line, from_payload,
                           one_line, to_payload, user_error_in)
from kd_ray.runs.files import finished_summary, read_history


class Broken(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise DataError("cannot read image /x/bad.png: truncated; delete or replace the file")


def test_loader_worker_error_becomes_one_line():
    with pytest.raises(DataError) as info:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "\n" in str(info.value)  # PyTorch wraps it with the worker's traceback
    assert one_line(info.value) == "cannot read image /x/bad.png: truncated; delete or replace the file"


def test_first_line_is_the_message_before_the_advice():
    assert first_line(RuntimeError("\n  Weights only load failed.  \nPlease file an issue")) == "Weights only load failed."
    assert first_line(TimeoutError()) == "TimeoutError"  # no text: its type
    assert first_line(" \n") == "" and first_line("job died\nlog: ...") == "job died"


def test_raise_user_error_finds_the_worker_cause():
    class FakeGroupError(Exception):
        worker_failures = {1: RuntimeError("wrapper")}

    FakeGroupError.worker_failures[1].__cause__ = DataError("bad thing; fix it")
    with pytest.raises(DataError, match=r"^bad thing; fix it \(rank 1\)$"):
        raise_user_error(FakeGroupError())
    raise_user_error(RuntimeError("not ours"))  # nothing to translate: returns


def test_history_keeps_the_latest_line_per_epoch(tmp_path):
    lines = ['{"epoch": 1, "val/top1": 0.1}', '{"epoch": 2, "val/top1": 0.2}',
             '{"epoch": 2, "val/top1": 0.3}', '{"epoch": 3, "val/top1": 0.4}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert [(h["epoch"], h["val/top1"]) for h in read_history(tmp_path)] == [(1, 0.1), (2, 0.3), (3, 0.4)]
    assert read_history(tmp_path / "none") == []


def test_finished_summary_only_when_all_epochs_ran(tmp_path):
    (tmp_path / "summary.json").write_text('{"epochs": 5}')
    assert finished_summary(tmp_path, 5) == {"epochs": 5}
    assert finished_summary(tmp_path, 8) is None
    assert finished_summary(tmp_path / "other", 1) is None


@pytest.mark.parametrize("error", [DataError("bad image x.png"), NonFiniteLossError("nan at step 3"),
                                   ConfigError("bad value")])
def test_errors_cross_processes_as_their_own_type(error):
    back = from_payload(to_payload(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert from_payload(None) is None and from_payload({"error": None}) is None
    assert type(from_payload({"error": "SomethingElse", "message": "m"})) is KdRayError


def test_user_error_in_finds_the_innermost_of_our_errors():
    class Wrapper(DataError):  # like Ray's RayTaskError(DataError): a subclass holding the cause
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last):\n ...\nDataError: inner")
            self.cause = cause

    inner = DataError("cannot read image a.png")
    assert user_error_in(Wrapper(inner)) is inner
    assert user_error_in(RuntimeError("not ours")) is None
