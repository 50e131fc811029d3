"""Open what export, eval, predict and bench take: a run folder (its student or teacher), an
exported file (.onnx, TorchScript .pt, .safetensors), a kd_ray teacher.pt, or an architecture name.

ONNX files open with ONNX Runtime (deploy.model, no torch); everything else opens in
deploy.torch_models, imported only then, so that `kd-ray predict` on an .onnx file never loads torch.
"""
from __future__ import annotations

from pathlib import Path

from kd_ray.deploy.model import Model, open_onnx
from kd_ray.errors import ModelFileError


def open_model(target, which: str = "student", image_size: int | None = None,
               num_classes: int = 1000) -> Model:
    """Any of READS; ``which`` picks the teacher of a run folder."""
    path = Path(str(target))
    if path.suffix.lower() == ".onnx" and path.is_file():
        if which != "student":
            raise ModelFileError(f"--which {which} needs a run folder; {path} is one model")
        return open_onnx(path)
    from kd_ray.deploy import torch_models  # the one local import: an ONNX file never loads torch

    return torch_models.open_torch_model(target, which, image_size, num_classes)
