"""Engine: one epoch of training and one evaluation pass in plain PyTorch (no Ray), loaders of a
rank, the optimizer and schedule, and atomic checkpoints."""
from kd_ray.engine.loaders import all_sum, make_loaders, shard_loader
from kd_ray.engine.guard import check_collapse
from kd_ray.engine.loop import (autocast_for, epoch_metrics, evaluate, split_metrics, stop_together,
                                to_device, train_one_epoch)
from kd_ray.engine.optim import build_optimizer
from kd_ray.engine.progress import StepProgress

__all__ = ["train_one_epoch", "evaluate", "epoch_metrics", "split_metrics", "check_collapse", "stop_together", "autocast_for", "to_device",
           "make_loaders", "shard_loader", "all_sum", "build_optimizer", "StepProgress"]
