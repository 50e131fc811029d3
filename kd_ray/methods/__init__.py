"""Distillation methods: the Distiller interface, its registry, the built-in logit methods and
the feature methods."""
from kd_ray.methods import crd, features, logits, logits_extra, reviewkd  # noqa: F401  (register ce, kd, mse_logits, dkd, dist; fitnets, at; ctkd, mlkd; crd; reviewkd)
from kd_ray.methods.base import (METHODS, Distiller, Outputs, TrainStep, build_method, loss_method,
                                 method_class, needs_teacher, setup_method)

__all__ = ["METHODS", "Distiller", "Outputs", "TrainStep", "build_method", "loss_method", "method_class",
           "needs_teacher", "setup_method"]
