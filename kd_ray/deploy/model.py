"""A model opened for export, eval, predict or bench, without torch: ``Model`` (an ONNX file on
ONNX Runtime; torch models are deploy.torch_models.TorchModel), its metadata record, and the
checks that need only the config.

Every opened model answers ``logits(batch)`` on NumPy arrays and carries ``meta``: classes, input
size and preprocessing (the same keys that exports write into their metadata).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kd_ray.config import teacher_files
from kd_ray.errors import ModelFileError, one_line

MODEL_FORMAT = "kd_ray-model-v1"
META_FILE = "kd_ray.json"  # TorchScript extra file / ONNX metadata key
READS = "a run folder, .onnx, TorchScript .pt, .safetensors, a kd_ray teacher.pt or an architecture name"


@dataclass
class Model:
    """An ONNX model (``session``); torch models are deploy.torch_models.TorchModel."""
    meta: dict
    kind: str  # run | teacher | arch | onnx | torchscript | safetensors
    path: Path | None
    module: Any = None  # an eval-mode torch.nn.Module (None for ONNX)
    session: Any = None  # an onnxruntime.InferenceSession
    extra: dict = field(default_factory=dict)  # run folders: the config, the last metrics

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        name = self.session.get_inputs()[0].name
        return self.session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def describe_meta(arch, classes, image_size, preprocess, **extra) -> dict:
    return {"format": MODEL_FORMAT, "arch": arch, "classes": [str(c) for c in classes],
            "num_classes": len(classes), "image_size": int(image_size), "input": "images",
            "output": "logits", "preprocess": preprocess, **extra}


def has_teacher(cfg) -> bool:
    """A distill run's teacher (one file or an ensemble's); a pipeline's baseline student names the
    same teacher file."""
    paths = teacher_files(cfg.distill)
    return bool(paths) and all(Path(str(p)).is_file() for p in paths)


def open_onnx(path: Path) -> Model:
    try:  # optional: the deploy extra
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise ModelFileError("reading .onnx files needs onnxruntime: pip install 'kd_ray[deploy]'") from None
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for a bad file
        raise ModelFileError(f"{path} is not a readable ONNX model ({one_line(exc)[:200]})") from None
    props = session.get_modelmeta().custom_metadata_map
    meta = meta_or_error(props.get(META_FILE), path, "ONNX metadata")
    return Model(meta, "onnx", path, session=session)


def meta_or_error(text, path: Path, where: str) -> dict:
    """The kd_ray metadata record an export wrote into ``path`` (JSON ``text``), checked."""
    try:
        meta = json.loads(text) if text else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path} has no kd_ray metadata ({where}): export it with `kd-ray export`")
    return meta
