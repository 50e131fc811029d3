"""GPU speed check of the teacher-logit cache (PyTorch + a CUDA GPU; no Ray, no pyarrow needed).

resnet50 teacher -> resnet18 student, 224 px, bf16 autocast, channels_last, synthetic batches on
the GPU. Images/s of kd_ray's engine.train_one_epoch for student-only cross-entropy, cached-logit
distillation (float16 logits in pinned host memory, copied per batch as the cache's loader does)
and online distillation, next to a plain PyTorch online-KD loop; plus the cache build's
teacher-inference images/s. Run through scripts/gpu_check.sh.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kd_ray.config import DistillConfig  # noqa: E402
from kd_ray.engine import train_one_epoch  # noqa: E402
from kd_ray.methods import TrainStep, build_method  # noqa: E402
from kd_ray.models import build_model  # noqa: E402
from gpu_smoke import device_args, sync  # noqa: E402  (scripts/ is on sys.path when run)

CLASSES = 1000
KD_CFG = DistillConfig(temperature=4.0, alpha=0.9)
FMT = torch.channels_last


def make_batches(n, batch, size, device):
    gen = torch.Generator(device=device).manual_seed(0)
    return [(torch.randn(batch, 3, size, size, device=device, generator=gen).contiguous(memory_format=FMT),
             torch.randint(0, CLASSES, (batch,), device=device, generator=gen)) for _ in range(n)]


@torch.inference_mode()
def build_cache(teacher, data):
    """The cache build: teacher inference once per image, float16 logits kept in host memory."""
    out = []
    for x, y in data:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            logits = teacher(x)
        host = logits.to(torch.float16).cpu()
        out.append((x, y, host.pin_memory() if torch.cuda.is_available() else host))
    return out


def plain_online_kd(student, teacher, data, opt):
    """What a user would write by hand: no loss dict, no NaN checks."""
    student.train()
    for x, y in data:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            logits = student(x)
            with torch.no_grad():
                t = teacher(x)
            soft = F.kl_div(F.log_softmax(logits.float() / 4, 1), F.log_softmax(t.float() / 4, 1),
                            reduction="batchmean", log_target=True) * 16
            loss = 0.9 * soft + 0.1 * F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def images_per_s(fn, data) -> float:
    fn(data[:5])  # warm-up (cudnn autotuning)
    sync()
    start = time.perf_counter()
    fn(data)
    sync()
    return sum(b[0].shape[0] for b in data) / (time.perf_counter() - start)


def main() -> None:
    args, device, name = device_args(steps=40, size=224)
    print(f"torch {torch.__version__}, {name}; resnet50 -> resnet18, {args.size} px, batch {args.batch}, "
          f"bf16, channels_last, {args.steps} timed steps per row", flush=True)
    torch.manual_seed(0)
    student = build_model("resnet18", CLASSES).to(device, memory_format=FMT)
    teacher = build_model("resnet50", CLASSES).to(device, memory_format=FMT).eval().requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    data = make_batches(args.steps, args.batch, args.size, device)
    build_speed = images_per_s(lambda d: build_cache(teacher, d), data)
    cached = build_cache(teacher, data)
    kd, ce = TrainStep(student, build_method(KD_CFG, "kd")), TrainStep(student, build_method(KD_CFG, "ce"))

    def ours(step, t):
        return lambda d: train_one_epoch(step, d, opt, epoch=1, device=device, teacher=t, amp=True,
                                         channels_last=True)

    rows = {"student-only CE (kd_ray)": (ours(ce, None), data),
            "cached-logit KD (kd_ray)": (ours(kd, teacher), cached),
            "online KD (kd_ray)": (ours(kd, teacher), data),
            "online KD (plain loop)": (lambda d: plain_online_kd(student, teacher, d, opt), data)}
    best = dict.fromkeys(rows, 0.0)
    for _ in range(2):  # interleaved, best of two: no row gains from its place in the order
        for key, (fn, batches) in rows.items():
            best[key] = max(best[key], images_per_s(fn, batches))
    print(f"\n{'mode':28} {'img/s':>9}")
    print(f"{'cache build (teacher inference)':28} {build_speed:9.0f}")
    for key, value in best.items():
        print(f"{key:28} {value:9.0f}")
    floor, online, plain = (best["student-only CE (kd_ray)"], best["online KD (kd_ray)"],
                            best["online KD (plain loop)"])
    cache = best["cached-logit KD (kd_ray)"]
    print(f"\ncached KD / student-only:      {cache / floor:.3f}  (1.0 = the teacher costs nothing)")
    print(f"online KD / student-only:      {online / floor:.3f}")
    print(f"cached KD / plain online KD:   {cache / plain:.3f}  (speed-up over the usual loop)")
    print(f"online KD kd_ray / plain loop: {online / plain:.3f}")
    # Build cost per image / time saved per image and epoch.
    epochs = (1 / build_speed) / (1 / online - 1 / cache) if cache > online else float("inf")
    print(f"the cache build pays for itself after {epochs:.2f} epoch(s) of one run", flush=True)


if __name__ == "__main__":
    main()
