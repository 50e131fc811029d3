"""Config: dataclass sections, YAML, ``--set`` overrides, and the checks that need no torch or Ray."""
from kd_ray.config.args_file import read_args_file
from kd_ray.config.load import SECTIONS, Config, apply_overrides, demo_config, load_config
from kd_ray.config.sections import (PATH_KEYS, STAGES, DataConfig, DistillConfig, GuardConfig,
                                    ModelConfig, OptimConfig, RunConfig, teacher_files)
from kd_ray.config.sweep import SweepConfig

__all__ = ["Config", "load_config", "demo_config", "apply_overrides", "read_args_file", "SECTIONS", "PATH_KEYS",
           "STAGES", "DataConfig", "ModelConfig", "DistillConfig", "GuardConfig", "OptimConfig", "RunConfig",
           "SweepConfig", "teacher_files"]
