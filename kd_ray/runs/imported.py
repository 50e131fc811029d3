"""``kd-ray import-teacher``: a teacher trained elsewhere becomes a ``teacher.pt``, after its head
is checked against the data's classes and its top-1 measured on the validation split (plain
PyTorch, in this process), before anything is distilled."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kd_ray.config import Config
from kd_ray.config.checks import check_paths
from kd_ray.data import build_data, describe
from kd_ray.engine import evaluate
from kd_ray.errors import ConfigError
from kd_ray.log import get
from kd_ray.models import InputAdapter, build_model, export_teacher, model_fn
from kd_ray.models.ensemble import adapt_input
from kd_ray.models.importer import describe_source, fit_weights, read_weights
from kd_ray.runs.summary import TEACHER_FILE
from kd_ray.storage import location, storage_root

log = get(__name__)


def default_out(cfg: Config, arch: str) -> Path:
    safe = arch.replace(":", "-").replace("/", "-")
    return location(storage_root(cfg.run.storage)) / f"teacher-{safe}" / TEACHER_FILE


def parse_triple(text: str | None, what: str):
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ConfigError(f"--{what} takes three numbers, one per channel (e.g. 0.485,0.456,0.406), "
                          f"got {text!r}")
    return values


def import_teacher(cfg: Config, arch: str, weights, out=None, image_size: int | None = None,
                   mean=None, std=None, prefix: str | None = None) -> tuple[Path, float]:
    """Check, evaluate and export; returns (teacher.pt path, validation top-1).

    ``image_size``, ``mean``, ``std``: the teacher's own input (default: the data's); students of
    another size or normalisation are adapted to it when distilling. Nothing is written unless
    every check passed.
    """
    check_paths(cfg, ())
    cfg = cfg.with_absolute_paths()
    model_fn(arch)  # an unknown name (or timm missing) stops here
    info = describe(cfg.data)
    if (mean is None) != (std is None):
        raise ConfigError("give both --mean and --std (the teacher's normalisation), or neither")
    norm = (tuple(mean), tuple(std)) if mean is not None else tuple(info.norm)
    size = image_size or info.image_size
    state = read_weights(weights)
    torch.manual_seed(0)
    model = fit_weights(build_model(arch, len(info.classes)), state, arch, weights, prefix)
    log.info(f"import-teacher: {arch} from {weights} ({describe_source(weights)}, {len(state)} "
             f"tensors), {len(info.classes)} classes, input {size} px")
    top1 = teacher_top1(model, cfg, size, norm)
    out = Path(out).expanduser().resolve() if out else default_out(cfg, arch)
    export_teacher(out, model, arch, info.classes, size, norm=norm,
                   extra={"imported": str(Path(weights).resolve()), "val_top1": top1})
    return out, top1


def teacher_top1(model, cfg: Config, size: int, norm, batch_size: int = 256) -> float:
    """Top-1 of ``model`` on the validation split, fed exactly as distillation feeds it: the data
    at the student's size and normalisation, adapted to the teacher's."""
    bundle = build_data(cfg.data, "teacher", cfg.run.seed)
    adapter = InputAdapter(bundle.image_size, bundle.norm, size, norm)
    model = adapt_input(model.eval().requires_grad_(False), adapter)
    loader = DataLoader(bundle.val, batch_size=batch_size, num_workers=cfg.data.loader_workers)
    sums = evaluate(model, progress(loader, "evaluating the teacher on the validation split"),
                    device=torch.device("cpu"))
    return sums["correct1"] / max(sums["count"], 1)


def progress(loader, what: str, every_s: float = 10.0):
    """``loader``'s batches, with a line at the start, every ``every_s`` seconds, and at the end."""
    total, seen, started = len(loader.dataset), 0, time.perf_counter()
    last = started
    log.info(f"{what}: {total} images")
    for batch in loader:
        yield batch
        seen += len(batch[1])
        now = time.perf_counter()
        if now - last >= every_s and seen < total:
            log.info(f"{what}: {seen}/{total} images ({seen / (now - started):.0f} images/s)")
            last = now
    log.info(f"{what}: {seen}/{total} images in {time.perf_counter() - started:.1f}s")
