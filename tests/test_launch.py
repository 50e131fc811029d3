"""Driver-side helpers of launch.py that need no Ray instance."""
import pytest
from torch.utils.data import DataLoader, Dataset

from kd_ray.errors import DataError
from kd_ray.launch import finished_summary, one_line, raise_user_error, read_history


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
