"""``kd-ray bench``: parameters, size, MACs, latency and throughput of models.

Latency is the median and 95th percentile of single-image calls, throughput the images per
second at a larger batch; each after warm-up calls, for PyTorch eager and for ONNX Runtime (the
model exported to a temporary file), on the CPU and, when there is one, the GPU. MACs are counted
by torch.utils.flop_counter at batch 1 (multiply-adds = FLOPs / 2).
"""
from __future__ import annotations

import csv
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from kd_ray.deploy.loading import open_model
from kd_ray.deploy.model import Model


def machine_line() -> str:
    import torch  # local: heavy

    parts = [f"{platform.machine()} {cpu_name()}", f"{os.cpu_count()} logical CPUs",
             f"torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    try:
        import onnxruntime

        parts.append(f"onnxruntime {onnxruntime.__version__}")
    except ModuleNotFoundError:
        pass
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    return "machine: " + ", ".join(parts)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


HISTORY_COLUMNS = ("date", "machine", "figure", "value", "target")


def append_history(path, machine: str, figures, date: str | None = None) -> Path:
    """Append a benchmark run's figures to ``history.csv`` (the header goes on a new file).

    ``figures``: ``(figure, value, target)`` triples, target "" where the figure has none. The
    bench scripts call this beside the table they write, so every run stays on record after its
    table file is overwritten by the next.
    """
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(HISTORY_COLUMNS)
        when = date or time.strftime("%Y-%m-%d %H:%M")
        writer.writerows((when, machine, figure, value, target) for figure, value, target in figures)
    return path


def timed(call, seconds: float, min_calls: int, warmup: int) -> list[float]:
    """Seconds per call: ``warmup`` untimed calls, then at least ``min_calls`` timed ones and
    more until ``seconds`` have passed."""
    for _ in range(warmup):
        call()
    times, start = [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times


def count_macs(module, image_size: int) -> int:
    import torch  # local: heavy
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() // 2


def weights_bytes(module) -> int:
    """Bytes of the state_dict's tensors: the size of an exported weights file, roughly."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def torch_module(model: Model):
    """An eager module for MACs and the PyTorch rows: an ONNX file's architecture, fresh weights."""
    if model.module is not None:
        return model.module
    from kd_ray.models import MODELS, build_model  # local: heavy

    if model.meta["arch"] in MODELS:
        return build_model(model.meta["arch"], model.meta["num_classes"]).eval()
    return None


def describe(target, model: Model) -> dict:
    module = torch_module(model)
    path = model.path if model.path is not None and model.kind not in ("run", "teacher") else None
    size = path.stat().st_size if path is not None else weights_bytes(module)
    params = sum(p.numel() for p in module.parameters()) if module is not None else None
    return {"model": str(target), "arch": model.meta["arch"], "params": params,
            "size_mb": size / 2**20, "macs": count_macs(module, model.meta["image_size"])
            if module is not None else None, "image_size": model.meta["image_size"]}


def speed(call_for_batch, image_size: int, batch: int, seconds: float) -> dict:
    one = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    many = np.random.default_rng(1).standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
    lat = timed(lambda: call_for_batch(one), seconds, min_calls=10, warmup=5)
    thr = timed(lambda: call_for_batch(many), seconds, min_calls=3, warmup=1)
    return {"p50_ms": 1e3 * statistics.median(lat), "p95_ms": 1e3 * float(np.percentile(lat, 95)),
            "images_per_s": batch * len(thr) / sum(thr), "batch": batch}


def torch_runner(module, device: str):
    import torch  # local: heavy

    module = module.to(device).eval()

    def call(batch: np.ndarray):
        with torch.no_grad():
            out = module(torch.from_numpy(batch).to(device))
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def onnx_runner(model: Model, tmp_dir: Path, provider: str, threads: int | None = None):
    """A session on the model's ONNX file, exported first when the model is a torch one."""
    import onnxruntime as ort

    path = model.path if model.kind == "onnx" else None
    if path is None:
        from kd_ray.deploy.export import _onnx  # local: heavy

        path = tmp_dir / "model.onnx"
        _onnx(model, path, tolerance=1e-3)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=[provider])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})


def bench(target, image_size=224, num_classes=1000, batch=32, seconds=3.0, onnx=True,
          devices=None, threads: int | None = None) -> list[dict]:
    """One row per (runtime, device) of one model; ``threads``: CPU threads of both runtimes
    (default: theirs, one per core)."""
    import torch  # local: heavy

    if threads:
        torch.set_num_threads(threads)
    model = open_model(target, image_size=image_size, num_classes=num_classes)
    info = describe(target, model)
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows, size = [], model.meta["image_size"]
    module = model.module
    for device in devices:
        if module is not None:
            rows.append({**info, "runtime": "pytorch", "device": device,
                         **speed(torch_runner(module, device), size, batch, seconds)})
            module.to("cpu")
        if onnx:
            provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
            import onnxruntime as ort

            if provider not in ort.get_available_providers():
                continue
            with tempfile.TemporaryDirectory() as tmp:
                rows.append({**info, "runtime": "onnxruntime", "device": device,
                             **speed(onnx_runner(model, Path(tmp), provider, threads), size, batch,
                                   seconds)})
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | arch | px | params | size MB | MACs | runtime | device | p50 ms (b1) | "
            "p95 ms (b1) | images/s (b{}) |".format(rows[0]["batch"] if rows else "?"))
    lines = [head, "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        params = f"{r['params']:,}" if r["params"] is not None else "-"
        macs = f"{r['macs'] / 1e6:,.1f}M" if r["macs"] is not None else "-"
        lines.append(f"| {r['model']} | {r['arch']} | {r['image_size']} | {params} | "
                     f"{r['size_mb']:.2f} | {macs} | {r['runtime']} | {r['device']} | "
                     f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['images_per_s']:,.0f} |")
    return "\n".join(lines)


def bench_command(args) -> int:
    if args.threads:
        import torch  # local: heavy

        torch.set_num_threads(args.threads)  # before the machine line, which shows it
    print(machine_line(), flush=True)
    rows = []
    for target in args.models:
        rows.extend(bench(target, args.image_size, args.num_classes, args.batch, args.seconds,
                          onnx=not args.no_onnx, threads=args.threads))
    print(table(rows), flush=True)
    return 0
