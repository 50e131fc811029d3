"""JPEG decode + augmentation throughput per CPU core at 224 px, and the loader workers a GPU needs.

Makes photo-like JPEGs (Imagenette sizes, ~500x375, quality 90: gradients, shapes, grain) in a
temporary folder, then times each path on one thread in one process (images/s = one CPU core):
  pil          PIL open + convert("RGB") (kd_ray's ImageFolder loader), decode only
  pil+aug      the same + kd_ray's own training transform at 224 px (data.augment=true:
               RandomResizedCrop(scale 0.35-1), flip, ToTensor, Normalize)
  pil draft    Image.draft("RGB", (224, 224)) before decoding (DCT downscaling; a no-op unless an
               image is at least 2x the target on both sides)
  tvio         torchvision.io.decode_jpeg(read_file(path)), uint8 tensor, decode only
  tvio rgb     the same with mode=ImageReadMode.RGB
  tvio+aug     kd_ray's data.decoder=torchvision path: decode_image(mode RGB) + the same
               augmentation in transforms.v2 on the uint8 tensor
Each repeat runs every path once, in turn; the best repeat counts (the machine may be shared).
The student's (resnet18) training step rate is measured on CPU for reference (batch 32, 1 thread)
and, when CUDA is available, on the GPU (batch 256, channels_last, bf16 autocast) together with
decode_jpeg(device="cuda"); loader workers per GPU = ceil(GPU step images/s / per-core pil+aug).
Without a GPU it prints that arithmetic for stated, hypothetical step rates.

    python scripts/bench_decode.py [--images 128] [--repeat 5] [--out benchmarks/decode.md]
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402
from torchvision.io import ImageReadMode, decode_jpeg, read_file  # noqa: E402

from kd_ray.data.datasets import make_transform  # noqa: E402
from kd_ray.data.sources import Source, _load_rgb, _load_uint8  # noqa: E402
from kd_ray.deploy.bench import append_history, cpu_name  # noqa: E402
from kd_ray.models import build_model  # noqa: E402

SIZE = 224
SHAPES = [(500, 375), (375, 500), (500, 333), (500, 400), (333, 500), (500, 375)]
HYPOTHETICAL_STEP_RATES = (1000, 2000, 3000, 5000)  # img/s: inputs to the arithmetic, not measured


def _field(rng, w: int, h: int, scale: int) -> np.ndarray:
    """Random colour noise at 1/scale resolution, smoothly upsampled; values in [-1, 1]."""
    small = (rng.random((max(h // scale, 1), max(w // scale, 1), 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32) / 127.5 - 1


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (q 90): texture at several scales, a few soft-edged shapes, grain.

    Pure noise or flat colour would make JPEG decoding unrealistically slow or fast; this mix
    gives file sizes of real photos of this size (~100-150 KB).
    """
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = SHAPES[i % len(SHAPES)]
        px = 127.5 + sum(amp * _field(rng, w, h, s) for s, amp in ((64, 70), (16, 50), (4, 40), (2, 35)))
        img = Image.fromarray(px.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(8):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        px = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)), np.float32)
        px += 30 * _field(rng, w, h, 2) + rng.normal(0, 14, (h, w, 1))  # texture back on the shapes
        path = folder / f"img{i:04d}.jpg"
        Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def pil_draft(path):
    with Image.open(path) as img:
        img.draft("RGB", (SIZE, SIZE))
        return img.convert("RGB")


def kd_transform(uint8: bool):
    """kd_ray's training transform at 224 px (data.augment=true) for data.decoder=pil/torchvision."""
    return make_transform(Source([], [], [], SIZE, True, None, uint8=uint8), SIZE, train=True, augment=True)


def paths_to_time():
    pil_aug, tv_aug = kd_transform(False), kd_transform(True)
    return {
        "pil": lambda p: _load_rgb(str(p)),
        "pil+aug": lambda p: pil_aug(_load_rgb(str(p))),
        "pil draft": pil_draft,
        "pil draft+aug": lambda p: pil_aug(pil_draft(p)),
        "tvio": lambda p: decode_jpeg(read_file(str(p))),
        "tvio rgb": lambda p: decode_jpeg(read_file(str(p)), mode=ImageReadMode.RGB),
        "tvio+aug": lambda p: tv_aug(_load_uint8(str(p))),
    }


def time_paths(paths: list[Path], repeat: int) -> dict[str, float]:
    """Best images/s of ``repeat`` passes over all images, per path (one thread)."""
    funcs, best = paths_to_time(), {}
    for name, fn in funcs.items():  # warm-up: page cache, lazy imports, allocator
        fn(paths[0])
    for r in range(repeat):
        for name, fn in funcs.items():
            torch.manual_seed(r)
            start = time.perf_counter()
            for p in paths:
                fn(p)
            rate = len(paths) / (time.perf_counter() - start)
            best[name] = max(best.get(name, 0.0), rate)
        print(f"  repeat {r + 1}/{repeat}: " + ", ".join(f"{k} {v:.0f}" for k, v in best.items()), flush=True)
    return best


def step_rate(device: str, batch: int, steps: int) -> float:
    """Student (resnet18, 10 classes) SGD training steps at 224 px: images/s, fwd+bwd+update."""
    model = build_model("resnet18", 10).to(device)
    cuda = device == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, SIZE, SIZE, device=device).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3 if cuda else 1):  # warm-up (cuDNN autotune, allocator)
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def gpu_decode_rate(paths: list[Path], repeat: int) -> float:
    """decode_jpeg(device="cuda") of a list of files at once, + random crop/resize on the GPU."""
    datas = [read_file(str(p)) for p in paths]
    aug = kd_transform(True)
    best = 0.0
    for _ in range(repeat + 1):  # the first pass warms nvjpeg up
        torch.cuda.synchronize()
        start = time.perf_counter()
        images = decode_jpeg(datas, device="cuda", mode=ImageReadMode.RGB)
        out = [aug(img) for img in images]
        torch.cuda.synchronize()
        best = max(best, len(out) / (time.perf_counter() - start))
    return best


def report(args, paths, rates, cpu_step, gpu) -> str:
    kb = np.mean([p.stat().st_size for p in paths]) / 1024
    sizes = sorted({Image.open(p).size for p in paths})
    lines = [
        "# JPEG decode + augmentation at 224 px, per CPU core",
        "",
        f"`python scripts/bench_decode.py --images {args.images} --repeat {args.repeat}`, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {cpu_name()}, "
        f"{__import__('os').cpu_count()} logical CPUs; torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, Pillow {Image.__version__}; 1 thread, 1 process.",
        f"Images: {len(paths)} synthetic photo-like JPEGs, quality 90, sizes "
        f"{', '.join(f'{w}x{h}' for w, h in sizes)}, mean file size {kb:.0f} KB.",
    ]
    if args.note:
        lines += ["", f"Note: {args.note}"]
    base, base_dec = rates["pil+aug"], rates["pil"]
    lines += ["", "| path | images/s per core | vs PIL (same stage) |", "|---|---:|---:|"]
    for name, rate in rates.items():
        ref = base if name.endswith("+aug") else base_dec
        lines.append(f"| {name} | {rate:.0f} | {rate / ref:.2f}x |")
    lines += ["", f"Image.draft reduced {_drafted(paths)} of {len(paths)} images (it decodes at 1/2, 1/4 "
              f"or 1/8 scale only when the result still covers {SIZE}x{SIZE}; the crop then comes "
              "from fewer pixels, so it changes the augmentation, and kd_ray does not use it)."]
    lines += ["", f"torchvision.io / PIL, decode + augmentation: {rates['tvio+aug'] / base:.2f}x; "
              f"decode only: {rates['tvio rgb'] / base_dec:.2f}x.",
              f"Student step on this CPU (resnet18, 224 px, batch 32, 1 thread): {cpu_step:.1f} "
              "images/s, for reference only: a GPU trains at many times this."]
    lines += ["", "## Loader workers per GPU", "",
              "workers = ceil(GPU step images/s / per-core decode+augment images/s), plus one core "
              "for the training process itself (`run.cpus_per_worker = data.loader_workers + 1`)."]
    if gpu:
        step, dec = gpu["step"], gpu["decode"]
        lines += ["", f"Measured on {gpu['name']}: resnet18 step {step:.0f} images/s (batch 256, "
                  f"channels_last, bf16); decode_jpeg(device=\"cuda\") + crop {dec:.0f} images/s.",
                  f"PIL path: ceil({step:.0f} / {base:.0f}) = {math.ceil(step / base)} workers; "
                  f"torchvision.io path: ceil({step:.0f} / {rates['tvio+aug']:.0f}) = "
                  f"{math.ceil(step / rates['tvio+aug'])} workers (per-core figures from this CPU)."]
    else:
        lines += ["", "No CUDA device: GPU decode and the GPU step rate were not measured (run this "
                  "script on the GPU node). Step rates below are hypothetical inputs, not measurements:",
                  "", "| GPU step images/s (hypothetical) | workers, PIL path | workers, torchvision.io path |",
                  "|---:|---:|---:|"]
        for r in HYPOTHETICAL_STEP_RATES:
            lines.append(f"| {r:,} | {math.ceil(r / base)} | {math.ceil(r / rates['tvio+aug'])} |")
    return "\n".join(lines) + "\n"


def _drafted(paths) -> int:
    count = 0
    for p in paths:
        with Image.open(p) as img:
            full = img.size
            img.draft("RGB", (SIZE, SIZE))
            count += img.size != full
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128, help="JPEGs to make and decode per pass")
    ap.add_argument("--repeat", type=int, default=5, help="passes per path; the best counts")
    ap.add_argument("--steps", type=int, default=3, help="timed student steps on CPU")
    ap.add_argument("--out", default="benchmarks/decode.md")
    ap.add_argument("--note", default="", help="a line added to the report (e.g. the machine was loaded)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"making {args.images} JPEGs ...", flush=True)
        paths = make_jpegs(Path(tmp), args.images)
        kb = np.mean([p.stat().st_size for p in paths]) / 1024
        print(f"mean file size {kb:.0f} KB; timing {args.repeat} passes per path, 1 thread", flush=True)
        rates = time_paths(paths, args.repeat)
        print("student step on CPU (resnet18, batch 32, 1 thread) ...", flush=True)
        cpu_step = step_rate("cpu", 32, args.steps)
        gpu = None
        if torch.cuda.is_available():
            torch.set_num_threads(4)
            gpu = {"name": torch.cuda.get_device_name(), "step": step_rate("cuda", 256, 20),
                   "decode": gpu_decode_rate(paths, args.repeat)}
        else:
            print("no CUDA device: GPU decode not measured", flush=True)
        text = report(args, paths, rates, cpu_step, gpu)
    print()
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    machine = (f"{platform.processor() or platform.machine()}, {cpu_name()}, {__import__('os').cpu_count()} "
               f"logical CPUs; torch {torch.__version__}, torchvision {torchvision.__version__}, 1 thread"
               + (f"; {args.note}" if args.note else ""))
    figures = [(f"{name} images/s per core", f"{rate:.0f}", "") for name, rate in rates.items()]
    figures += [("torchvision.io / PIL, decode + augmentation", f"{rates['tvio+aug'] / rates['pil+aug']:.2f}", ""),
                ("torchvision.io / PIL, decode only", f"{rates['tvio rgb'] / rates['pil']:.2f}", "")]
    history = append_history(out.parent / "history.csv", machine, figures)
    print(f"wrote {out}, appended to {history}")


if __name__ == "__main__":
    main()
