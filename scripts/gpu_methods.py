"""GPU check of every built-in method (PyTorch + torchvision + a CUDA GPU; no Ray).

resnet34 teacher -> resnet18 student, 100 classes, bf16 autocast, channels_last: a few training
steps of kd_ray's engine.train_one_epoch per method (feature methods on layer2..layer4), then
asserts a finite loss that moved and prints images/s per method next to student-only CE.

    python scripts/gpu_methods.py [--batch 128] [--steps 20] [--size 64] [--device cpu]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kd_ray.config import DistillConfig  # noqa: E402
from kd_ray.engine import train_one_epoch  # noqa: E402
from kd_ray.methods import METHODS, TrainStep, build_method  # noqa: E402
from kd_ray.methods.base import setup_method  # noqa: E402
from kd_ray.models import build_model  # noqa: E402
from gpu_smoke import device_args, sync  # noqa: E402

CLASSES = 100
DEEP = ["layer2", "layer3", "layer4"]
PARAMS = {
    "fitnets": {"student_layer": "layer3", "teacher_layer": "layer3"},
    "at": {"student_layers": DEEP, "teacher_layers": DEEP},
    "crd": {"student_layer": "avgpool", "teacher_layer": "avgpool", "nce_k": 4096},
    "reviewkd": {"student_layers": DEEP, "teacher_layers": DEEP},
}


def main() -> None:
    args, device, name = device_args(steps=20, size=64)
    print(f"torch {torch.__version__}, {name}; resnet34 -> resnet18, {args.size} px, batch {args.batch}, "
          f"bf16, channels_last, {args.steps} steps per method", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    data = [(torch.randn(args.batch, 3, args.size, args.size, device=device, generator=gen)
             .contiguous(memory_format=torch.channels_last),
             torch.randint(0, CLASSES, (args.batch,), device=device, generator=gen)) for _ in range(args.steps)]
    # An index per image for methods that need one (crd's memory bank), as data.views.Indexed adds.
    indexed = [(x, y, {"index": torch.arange(i * args.batch, (i + 1) * args.batch, device=device)})
               for i, (x, y) in enumerate(data)]
    torch.manual_seed(0)
    teacher = build_model("resnet34", CLASSES).to(device, memory_format=torch.channels_last)
    teacher.eval().requires_grad_(False)
    print(f"\n{'method':10} {'img/s':>8} {'first loss':>11} {'last loss':>10}")
    speeds, failed = {}, []
    for method_name in METHODS.names():
        torch.manual_seed(0)
        student = build_model("resnet18", CLASSES).to(device, memory_format=torch.channels_last)
        method = build_method(DistillConfig(loss=method_name, params=PARAMS.get(method_name, {})))
        setup_method(method, student, teacher if method.teacher else None, data[0][0][:2],
                     train_size=args.batch * args.steps)
        method.to(device)
        step = TrainStep(student, method)
        opt = torch.optim.SGD(step.parameters(), lr=0.01, momentum=0.9)
        batches = indexed if method.needs_index else data
        losses = []
        try:
            for i, batch in enumerate(batches):
                if i == 3:  # warm-up (cudnn autotuning) before the clock starts
                    sync()
                    start = time.perf_counter()
                sums = train_one_epoch(step, [batch], opt, epoch=1, device=device,
                                       teacher=teacher if method.teacher else None, amp=True,
                                       channels_last=True)
                losses.append(sums["loss_sum"] / sums["images"])
            sync()
            speeds[method_name] = (len(batches) - 3) * args.batch / (time.perf_counter() - start)
            ok = all(torch.isfinite(torch.tensor(losses))) and losses[-1] != losses[0]
            print(f"{method_name:10} {speeds[method_name]:8.0f} {losses[0]:11.4f} {losses[-1]:10.4f}"
                  f"{'' if ok else '  NOT OK'}", flush=True)
            if not ok:
                failed.append(method_name)
        except Exception as exc:  # report every method, then fail
            failed.append(method_name)
            print(f"{method_name:10} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
    base = speeds.get("ce")
    if base:
        print("\nimg/s relative to student-only CE: " +
              ", ".join(f"{m} {v / base:.2f}" for m, v in speeds.items() if m != "ce"))
    if failed:
        raise SystemExit(f"methods that failed on {name}: {', '.join(failed)}")
    print(f"every method trained on {name} under bf16 autocast", flush=True)


if __name__ == "__main__":
    main()
