"""Engine: one epoch of training and one evaluation pass in plain PyTorch (no Ray), loaders of a
rank, the optimizer and schedule, and atomic checkpoints.

The names below load their module on first use (PEP 562): ``kd_ray.engine.checkpoints`` alone,
which Ray Train's controller needs for our callbacks, then imports no data or torchvision code
(about 1.5 CPU seconds per run on a small machine)."""
import importlib

_WHERE = {
    "all_sum": "loaders", "make_loaders": "loaders", "shard_loader": "loaders",
    "check_collapse": "guard",
    "autocast_for": "loop", "epoch_metrics": "loop", "evaluate": "loop", "split_metrics": "loop",
    "stop_together": "loop", "to_device": "loop", "train_one_epoch": "loop",
    "build_optimizer": "optim",
    "StepProgress": "progress",
}

__all__ = ["train_one_epoch", "evaluate", "epoch_metrics", "split_metrics", "check_collapse", "stop_together", "autocast_for", "to_device",
           "make_loaders", "shard_loader", "all_sum", "build_optimizer", "StepProgress"]


def __getattr__(name: str):
    if name not in _WHERE:  # a submodule (``from kd_ray.engine import checkpoints``) is found by import
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
