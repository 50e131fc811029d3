"""Models: the architecture registry, local weights, the teacher file, and teachers as a batch
sees them (input adapters, ensembles)."""
from kd_ray.models.ensemble import (InputAdapter, TeacherEnsemble, check_same_classes, load_teachers,
                                    teacher_norm)
from kd_ray.models.teacher import (TEACHER_FORMAT, check_teacher_matches, export_teacher, load_teacher,
                                   read_teacher_info)
from kd_ray.models.zoo import MODELS, build_model, count_params, load_weights, model_fn, require_file

__all__ = ["MODELS", "build_model", "count_params", "load_weights", "model_fn", "require_file",
           "TEACHER_FORMAT", "export_teacher", "load_teacher", "read_teacher_info", "check_teacher_matches",
           "InputAdapter", "TeacherEnsemble", "check_same_classes", "load_teachers", "teacher_norm"]
