"""Models: the architecture registry, local weights, and the teacher file."""
from kd_ray.models.teacher import (TEACHER_FORMAT, check_teacher_matches, export_teacher, load_teacher,
                                   read_teacher_info)
from kd_ray.models.zoo import MODELS, build_model, count_params, load_weights, require_file

__all__ = ["MODELS", "build_model", "count_params", "load_weights", "require_file", "TEACHER_FORMAT",
           "export_teacher", "load_teacher", "read_teacher_info", "check_teacher_matches"]
