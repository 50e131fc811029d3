"""``kd-ray export``: a run's student (or teacher) as ONNX, TorchScript or safetensors.

Eval mode, a dynamic batch axis, the classes / input size / preprocessing inside the file and in
a JSON beside it. Every file is written under a temporary name and renamed only after its check
passed: ONNX Runtime (or the reloaded TorchScript module) against PyTorch on the same batch, at
a batch size other than the one used for export, so a frozen batch axis fails too.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from kd_ray.deploy.loading import open_model
from kd_ray.deploy.model import META_FILE, Model
from kd_ray.errors import ModelFileError, first_line, one_line

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
TOLERANCE = 1e-3  # max abs logit difference accepted; float32 kernels differ by ~1e-6
OPSET = 17


def sample_batch(model: Model, batch: int, seed: int = 0) -> np.ndarray:
    size = model.meta["image_size"]
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def default_out(target: Path, which: str, fmt: str) -> Path:
    """<run>/export/<which>.<ext>, or export/<stem>.<ext> beside a model file (never itself)."""
    target = Path(target)
    if target.is_dir():
        return target / "export" / f"{which}{FORMATS[fmt]}"
    return target.parent / "export" / f"{target.stem}{FORMATS[fmt]}"


def export(target, fmt: str = "onnx", out=None, which: str = "student",
           tolerance: float = TOLERANCE) -> tuple[Path, dict]:
    """Write the model; returns (path, report) where report has max_abs_diff (ONNX, TorchScript)."""
    if fmt not in FORMATS:
        raise ModelFileError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out = Path(out) if out else default_out(Path(target), which, fmt)
    check_out(out)  # before the model loads: a wrong --out is refused at once
    model = open_model(target, which)
    if model.module is None:
        raise ModelFileError(f"{target} is already an ONNX file; export from the run folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp_{os.getpid()}_{out.name}")
    try:
        report = {"onnx": _onnx, "torchscript": _torchscript, "safetensors": _safetensors}[fmt](
            model, tmp, tolerance)
        side = out.with_name(out.name + ".json")
        side_tmp = side.with_name(f".tmp_{os.getpid()}_{side.name}")
        side_tmp.write_text(json.dumps({**model.meta, "file": out.name, "file_format": fmt,
                                        **report}, indent=2))
        os.replace(tmp, out)
        os.replace(side_tmp, side)
    finally:
        for leftover in out.parent.glob(f".tmp_{os.getpid()}_*"):
            leftover.unlink(missing_ok=True)
    return out, report


def check_out(out: Path) -> None:
    """Refuse an output path that is a folder, or whose folder cannot be made (a file on its way)."""
    if out.is_dir():
        raise ModelFileError(f"--out {out} is a folder: give a file name in it, e.g. {out / out.name}")
    for folder in out.parents:
        if folder.exists():
            if not folder.is_dir():
                raise ModelFileError(f"--out {out}: {folder} is a file, not a folder: pick another "
                                     "--out, or move the file away")
            return


def _check(reference: np.ndarray, got: np.ndarray, tolerance: float, what: str) -> dict:
    diff = float(np.abs(reference - got).max())
    if not np.isfinite(diff) or diff > tolerance:
        raise ModelFileError(f"{what} output differs from PyTorch by {diff:.3g} (tolerance "
                             f"{tolerance:g}); nothing written: report the architecture, or raise "
                             "--tolerance if the difference is expected")
    return {"max_abs_diff": diff, "checked_batch": int(reference.shape[0])}


def _onnx(model: Model, tmp: Path, tolerance: float) -> dict:
    import torch  # local: heavy

    try:
        import onnx
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise ModelFileError("ONNX export needs onnx and onnxruntime: pip install 'kd_ray[deploy]'") from None
    example = torch.from_numpy(sample_batch(model, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # the TorchScript-based exporter: deprecated, but fast (< 1 s for a small CNN)
            with _quiet_fds():  # on failure it prints the whole graph (torch 2.14 leaves its log on)
                torch.onnx.export(model.module, (example,), str(tmp), dynamo=False,
                                  opset_version=OPSET, input_names=["images"],
                                  output_names=["logits"], verbose=False,
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        except Exception as exc:  # e.g. adaptive pooling to a size that does not divide the input
            _dynamo_export(model, example, tmp, first_error=exc)
    proto = onnx.load(str(tmp))
    for key, value in _props(model.meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"kd_ray {model.meta['arch']} ({model.meta.get('stage')})"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    batch = sample_batch(model, 3, seed=1)  # not the export batch size: the axis must be dynamic
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": batch})[0]
    return _check(model.logits(batch), got, tolerance, "ONNX Runtime")


@contextlib.contextmanager
def _quiet_fds():
    """Silence C++ writes to stdout and stderr (file descriptors 1 and 2) for a moment."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _dynamo_export(model: Model, example, tmp: Path, first_error: Exception) -> None:
    """The torch.export-based exporter (needs onnxscript): slower, handles more operators.

    ``first_error``: why the TorchScript-based one failed; a model both refuse names both."""
    import torch  # local: heavy

    tmp.unlink(missing_ok=True)
    try:
        torch.onnx.export(model.module, (example,), str(tmp), dynamo=True, opset_version=18,
                          input_names=["images"], output_names=["logits"], verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
    except Exception as exc:
        raise ModelFileError(f"ONNX export of {model.meta['arch']} failed: TorchScript exporter: "
                             f"{first_line(first_error)[:200]}; dynamo exporter: {first_line(exc)[:200]}") from None


def _props(meta: dict) -> dict:
    """Flat string metadata_props for other tools, plus the whole record under kd_ray.json."""
    pre = meta["preprocess"]
    return {META_FILE: json.dumps(meta), "classes": json.dumps(meta["classes"]),
            "image_size": str(meta["image_size"]), "mean": json.dumps(pre["mean"]),
            "std": json.dumps(pre["std"]), "resize": pre["resize"], "arch": meta["arch"]}


def _torchscript(model: Model, tmp: Path, tolerance: float) -> dict:
    import torch  # local: heavy

    example = torch.from_numpy(sample_batch(model, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(model.module, example, check_trace=False)
        except Exception as exc:
            raise ModelFileError(f"TorchScript trace of {model.meta['arch']} failed: {one_line(exc)[:200]}") from None
        torch.jit.save(traced, str(tmp), _extra_files={META_FILE: json.dumps(model.meta)})
        reloaded = torch.jit.load(str(tmp), map_location="cpu")  # inside the catch above
    batch = sample_batch(model, 3, seed=1)
    with torch.no_grad():
        got = reloaded(torch.from_numpy(batch)).numpy()
    return _check(model.logits(batch), got, tolerance, "TorchScript")


def _safetensors(model: Model, tmp: Path, tolerance: float) -> dict:
    from safetensors.torch import save_file  # local: heavy

    state = {k: v.detach().contiguous() for k, v in model.module.state_dict().items()}
    save_file(state, str(tmp), metadata={META_FILE: json.dumps(model.meta)})
    return {"tensors": len(state)}
