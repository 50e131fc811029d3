"""Distillation methods: the Distiller interface, its registry, and the built-in logit methods."""
from kd_ray.methods import logits  # noqa: F401  (registers ce, kd, mse_logits)
from kd_ray.methods.base import (METHODS, Distiller, Outputs, TrainStep, build_method, loss_method,
                                 method_class, needs_teacher)

__all__ = ["METHODS", "Distiller", "Outputs", "TrainStep", "build_method", "loss_method", "method_class",
           "needs_teacher"]
