"""The torch side of deploy.loading.open_model: run folders (student or teacher), TorchScript files, kd_ray
teacher.pt files, .safetensors exports and architecture names, as ``TorchModel``s.

deploy.loading imports this module only for a target that is not an ONNX file, so that
``kd-ray predict`` on an .onnx file never imports torch.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from kd_ray.config import Config, load_config, teacher_files
from kd_ray.data import describe, load_source
from kd_ray.deploy.images import IMAGENET, preprocess_spec
from kd_ray.deploy.model import (META_FILE, READS, Model, describe_meta, has_teacher, meta_or_error,
                                 open_onnx)
from kd_ray.engine import checkpoints
from kd_ray.errors import KdRayError, ModelFileError, one_line
from kd_ray.models import MODELS, TEACHER_FORMAT, build_model, load_teacher, load_teachers

log = logging.getLogger(__name__)

TENSOR_DATASETS = ("mnist5k", "digits", "synthetic")


class TorchModel(Model):
    """A model with an eval-mode torch ``module``."""

    def logits(self, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.from_numpy(np.ascontiguousarray(batch))).float().numpy()


def open_torch_model(target, which: str = "student", image_size: int | None = None,
                     num_classes: int = 1000) -> Model:
    """deploy.loading.open_model for anything but an ONNX file (see there)."""
    path = Path(str(target))
    if path.is_dir():
        return open_run(path, which)
    if not path.exists():
        if str(target) in MODELS:
            return open_arch(str(target), image_size or 224, num_classes)
        raise ModelFileError(f"{target} is neither a file, a folder nor an architecture; pass {READS}")
    if which != "student":
        raise ModelFileError(f"--which {which} needs a run folder; {path} is one model")
    suffix = path.suffix.lower()
    if suffix == ".onnx":  # not a plain file (loading.open_model opens those): let ONNX Runtime say why
        return open_onnx(path)
    if suffix == ".safetensors":
        return open_safetensors(path)
    if suffix in (".pt", ".pth", ".ts", ".torchscript"):
        return open_torch_file(path)
    raise ModelFileError(f"{path} has an unknown suffix {path.suffix!r}; pass {READS}")


def data_is_pil(data_cfg) -> bool:
    """Whether the run's dataset uses the PIL transforms (see data.datasets.make_transform)."""
    if data_cfg.name in ("imagefolder", "parquet"):
        return True
    if data_cfg.name in TENSOR_DATASETS:
        return False
    try:  # a plugin dataset: ask it (reads its listing)
        return load_source(data_cfg).pil
    except KdRayError:
        log.warning("dataset %s is not readable here; assuming ImageNet preprocessing", data_cfg.name)
        return True


def open_run(run_dir: Path, which: str = "student") -> TorchModel:
    found = checkpoints.latest(run_dir, with_state=True)
    if found is None:
        raise ModelFileError(f"{run_dir} holds no finished checkpoint (checkpoint_*/state.pt): "
                             "pass the folder of a run that trained at least one epoch")
    folder, manifest, state = found
    cfg = Config.from_dict(state["config"])
    spec = preprocess_spec(data_is_pil(cfg.data), state["image_size"])
    history = manifest.get("history") or [{}]
    common = {"run": str(run_dir), "checkpoint": folder.name, "epoch": state["epoch"]}
    extra = {"config": cfg, "last": history[-1], "stage": state["stage"]}
    if which == "teacher" and state["stage"] != "teacher":
        if not has_teacher(cfg):
            raise ModelFileError(f"{run_dir} is a {state['stage']} run without a teacher file "
                                 "(distill.teacher_path): use --which student or a distill run")
        paths = teacher_files(cfg.distill)
        if len(paths) > 1:  # an ensemble: one module fed the student's input (each member adapts it)
            norm = state.get("norm") or describe(cfg.data).norm
            module = load_teachers(paths, cfg.distill.teacher_weights, state["image_size"], norm)
            meta = describe_meta("ensemble", state["classes"], state["image_size"], spec,
                                 stage="teacher", source=",".join(map(str, paths)), **common)
            return TorchModel(meta, "teacher", Path(str(paths[0])), module.eval(), extra=extra)
        module, info = load_teacher(cfg.distill.teacher_path)
        meta = describe_meta(info["arch"], info["classes"], info["image_size"],
                             preprocess_spec(spec["resize"] != "square", info["image_size"]),
                             stage="teacher", source=str(cfg.distill.teacher_path), **common)
        return TorchModel(meta, "teacher", Path(cfg.distill.teacher_path), module.eval(), extra=extra)
    model = build_model(state["arch"], len(state["classes"]))
    model.load_state_dict(state["model"])
    meta = describe_meta(state["arch"], state["classes"], state["image_size"], spec,
                         stage=state["stage"], val_top1=history[-1].get("val/top1"), **common)
    return TorchModel(meta, "run", folder / checkpoints.STATE_FILE, model.eval(), extra=extra)


def open_arch(name: str, image_size: int, num_classes: int) -> TorchModel:
    module = build_model(name, num_classes).eval()  # random weights: for size and speed only
    meta = describe_meta(name, [str(i) for i in range(num_classes)], image_size,
                         preprocess_spec(True, image_size), stage="random weights")
    return TorchModel(meta, "arch", None, module)


def open_safetensors(path: Path) -> TorchModel:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a readable safetensors file ({one_line(exc)})") from None
    meta = meta_or_error(header.get(META_FILE), path, "safetensors metadata")
    module = build_model(meta["arch"], meta["num_classes"])
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"{path} does not fit {meta['arch']}: {one_line(exc)[:200]}") from None
    return TorchModel(meta, "safetensors", path, module.eval())


def open_torch_file(path: Path) -> TorchModel:
    """A TorchScript file from ``kd-ray export``, or a kd_ray teacher.pt."""
    with warnings.catch_warnings():  # torch.load and torch.jit.load warn about each other
        warnings.simplefilter("ignore")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # TorchScript archives and foreign pickles do not load this way
            raw = None
    if isinstance(raw, dict) and raw.get("format") == TEACHER_FORMAT:
        module, info = load_teacher(path)
        meta = describe_meta(info["arch"], info["classes"], info["image_size"],
                             _teacher_preprocess(info), stage="teacher")
        return TorchModel(meta, "teacher", path, module)
    files = {META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    except Exception as exc:
        raise ModelFileError(f"{path} is neither a TorchScript model nor a kd_ray teacher file "
                             f"({one_line(exc)[:160]}); pass {READS}") from None
    meta = meta_or_error(files[META_FILE] or None, path, "TorchScript extra file kd_ray.json")
    return TorchModel(meta, "torchscript", path, module.eval())


def _teacher_preprocess(info: dict) -> dict:
    """The teacher file does not name its dataset: the run that trained it does (config.yaml)."""
    run = (info.get("extra") or {}).get("run")
    config = Path(run) / "config.yaml" if run else None
    if config is not None and config.is_file():
        try:
            return preprocess_spec(data_is_pil(load_config(config).data), info["image_size"])
        except KdRayError:
            pass
    return {**IMAGENET, "image_size": int(info["image_size"]), "layout": "NCHW RGB float32"}
