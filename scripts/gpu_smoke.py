"""GPU check of kd_ray's training path (needs PyTorch + torchvision + a CUDA GPU, not Ray).

resnet50 teacher -> resnet18 student, 224 px, bf16 autocast, synthetic batches already on the GPU.
Checks: the KD loss under bf16 matches fp32, NaN is caught, evaluate() works, one NCCL DDP step
(world size 1). Measures images/s of kd_ray's engine.train_one_epoch against a plain PyTorch
loop of the same model and data (student-only cross-entropy and online distillation), with and
without channels_last, and prints the ratios.

    python scripts/gpu_smoke.py [--batch 256] [--steps 30]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kd_ray.config import DistillConfig  # noqa: E402
from kd_ray.engine import evaluate, train_one_epoch  # noqa: E402
from kd_ray.errors import NonFiniteLossError  # noqa: E402
from kd_ray.methods import TrainStep, build_method  # noqa: E402
from kd_ray.models import build_model  # noqa: E402

CLASSES = 100
KD_CFG = DistillConfig(temperature=4.0, alpha=0.9)


def batches(n, batch, device, channels_last):
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, 224, 224, device=device, generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, CLASSES, (batch,), device=device, generator=gen)))
    return out


def models(device, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    student = build_model("resnet18", CLASSES).to(device, memory_format=fmt)
    teacher = build_model("resnet50", CLASSES).to(device, memory_format=fmt).eval().requires_grad_(False)
    return student, teacher


def plain_loop(student, teacher, data, opt, distill):
    """What a user would write by hand: no per-step host syncs, no loss dict."""
    student.train()
    for x, y in data:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            logits = student(x)
            if distill:
                with torch.no_grad():
                    t = teacher(x)
                soft = F.kl_div(F.log_softmax(logits.float() / 4, 1), F.log_softmax(t.float() / 4, 1),
                                reduction="batchmean", log_target=True) * 16
                loss = 0.9 * soft + 0.1 * F.cross_entropy(logits.float(), y)
            else:
                loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def images_per_s(fn, data, warmup_data) -> float:
    fn(warmup_data)
    sync()
    start = time.perf_counter()
    fn(data)
    sync()
    return sum(x.shape[0] for x, _ in data) / (time.perf_counter() - start)


def speed_table(device, args) -> None:
    rows = []
    for channels_last in (False, True):
        data = batches(args.steps, args.batch, device, channels_last)
        warm = data[:5]
        student, teacher = models(device, channels_last)
        opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
        for name, distill in (("student-only CE", False), ("online KD", True)):
            step = TrainStep(student, build_method(KD_CFG, "kd" if distill else "ce"))
            t = teacher if distill else None
            ours_fn = lambda d: train_one_epoch(  # noqa: E731
                step, d, opt, epoch=1, device=device, teacher=t, amp=True, channels_last=channels_last)
            plain_fn = lambda d: plain_loop(student, teacher, d, opt, distill)  # noqa: E731
            # Interleaved, best of two each: neither side gains from running second.
            ours, plain = 0.0, 0.0
            for _ in range(2):
                ours = max(ours, images_per_s(ours_fn, data, warm))
                plain = max(plain, images_per_s(plain_fn, data, warm))
            rows.append((name, channels_last, ours, plain))
    print(f"\n{'mode':16} {'channels_last':>13} {'kd_ray img/s':>13} {'plain img/s':>12} {'ratio':>6}")
    for name, cl, ours, plain in rows:
        print(f"{name:16} {str(cl):>13} {ours:13.0f} {plain:12.0f} {ours / plain:6.3f}")
    by = {(n, cl): o for n, cl, o, _ in rows}
    for cl in (False, True):
        print(f"online KD / student-only (kd_ray, channels_last={cl}): "
              f"{by[('online KD', cl)] / by[('student-only CE', cl)]:.3f}")


def checks(device) -> None:
    student, teacher = models(device, False)
    x, y = batches(1, 64, device, False)[0]
    kd = build_method(KD_CFG, "kd")
    with torch.no_grad():
        ref = kd.loss(student(x), teacher(x), y)["loss"].item()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = kd.loss(student(x), teacher(x), y)["loss"].item()
    print(f"kd loss fp32 {ref:.5f} bf16 {low:.5f} (rel. diff {abs(ref - low) / abs(ref):.2e})")
    assert abs(ref - low) / abs(ref) < 5e-2, "bf16 KD loss far from fp32"
    val = evaluate(student, [(x, y)], device=device, amp=True)
    assert val["count"] == 64 and 0 <= val["correct1"] <= 64
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    try:
        train_one_epoch(TrainStep(student, kd), [(x * float("nan"), y)], opt, epoch=3, device=device,
                        teacher=teacher, amp=True)
        raise AssertionError("NaN loss not caught")
    except NonFiniteLossError as exc:
        print(f"NaN caught: {exc}")
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    student, _ = models(device, False)  # the NaN step above may have reached the weights
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    ddp = DistributedDataParallel(TrainStep(student, kd),
                                  device_ids=[device.index or 0] if backend == "nccl" else None)
    sums = train_one_epoch(ddp, [(x, y)] * 3, torch.optim.SGD(ddp.parameters(), lr=0.01),
                           epoch=1, device=device, teacher=teacher, amp=True)
    dist.destroy_process_group()
    print(f"{backend} DDP step ok: {sums['images']} images, loss {sums['loss_sum'] / sums['images']:.4f}")


def device_args(steps: int, **extra: int) -> tuple[argparse.Namespace, torch.device, str]:
    """--batch, --steps, --device (cpu: a dry run of the script itself) and ``--extra`` ints."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--device", default="cuda", help="cpu: a quick dry run of the script itself")
    for flag, default in extra.items():
        parser.add_argument(f"--{flag}", type=int, default=default)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    return args, device, torch.cuda.get_device_name() if device.type == "cuda" else "CPU"


def main() -> None:
    args, device, name = device_args(steps=30)
    print(f"torch {torch.__version__}, {name}, batch {args.batch}, "
          f"{args.steps} timed steps per row")
    checks(device)
    speed_table(device, args)


if __name__ == "__main__":
    main()
