"""Speed of distillation with the teacher-logit cache, and of kd_ray's Ray Train path, on CPU.

Each figure is a ratio of two timings taken in this one run (the machine is shared and noisy):
  B1  cached-logit KD step / student-only cross-entropy step (the floor)        target <= 1.05
      (and online KD step / CE step, for reference)
  B2  kd_ray TorchTrainer, 1 worker, steady-state images/s / plain PyTorch loop  target >= 0.95
  START  a 1-worker stage's start-up (run_stage to its first epoch): one Ray task   target <= 0.5
      (run.runner auto, the default) / a TorchTrainer (run.runner train), 2 runs each
  B3  8-trial (T, alpha) sweep incl. the cache build / 8 x plain student run     target <= 1.15
      (and the same sweep with the live teacher, for reference)
  B3-ASHA  the same 8 trials with ASHA early stopping on val/loss (sweep        target <= 0.6
      defaults: grace 1 epoch, factor 2) / 8 x plain student run (and on val/top1, which
      ties at 100% here, for reference); the sweeps also print where a
      trial's time goes (Ray start-up, setup, epochs, teardown), next to Ray Train's own
      start-up with an empty train function (--only FLOOR)
  B4  cached-KD epoch images/s / labels-only epoch images/s, the same augmented  target >= 0.97
      PNG image folder (96 px files trained at 32 px), train_one_epoch on both sides
Synthetic 32 px data (B1-B3); a resnet18 teacher (random weights: speed only) and the simple_cnn
student; 1 thread per worker on both sides.

    python scripts/bench_kd.py [--quick] [--skip-live] [--out benchmarks/results.md]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray runs its workers at niceness 15; the plain loops here run at 0. On 2 cores that difference in
# CPU share (against Ray's own services) outweighs the code's: give the workers the loops' priority.
os.environ.setdefault("RAY_worker_niceness", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from kd_ray import cache as teacher_cache  # noqa: E402
from kd_ray.config import Config  # noqa: E402
from kd_ray.data import build_data, write_synthetic_imagefolder  # noqa: E402
from kd_ray.data.views import CachedViews, ViewSampler  # noqa: E402
from kd_ray.deploy.bench import append_history  # noqa: E402
from kd_ray.engine import build_optimizer, evaluate, make_loaders, train_one_epoch  # noqa: E402
from kd_ray.methods import TrainStep, build_method  # noqa: E402
from kd_ray.models import build_model, export_teacher, load_teacher  # noqa: E402

TEACHER, STUDENT, BATCH = "resnet18", "simple_cnn", 64
SPACE = {"distill.temperature": [1, 2, 4, 8], "distill.alpha": [0.5, 0.9]}


def make_config(storage: Path, teacher: Path, images: int, epochs: int, **distill) -> Config:
    return Config.from_dict({
        "data": {"name": "synthetic", "synthetic_size": images, "image_size": 32},
        "model": {"teacher": TEACHER, "student": STUDENT},
        "distill": {"loss": "kd", "teacher_path": str(teacher), **distill},
        "optim": {"epochs": epochs, "batch_size": BATCH, "lr": 0.02},
        "run": {"storage": str(storage), "num_workers": 1, "threads_per_worker": 1},
        "sweep": {"space": SPACE, "scheduler": "none"},
    })


def b1_steps(cfg: Config, steps: int) -> dict:
    """Per-step seconds (batch fetch + forward + backward + update), the variants interleaved."""
    torch.set_num_threads(cfg.run.threads_per_worker)
    cache_dir = Path(cfg.run.storage) / "b1_cache"
    teacher_cache.build(cfg, cache_dir)
    plain = build_data(cfg.data, "distill", 0).train
    cached = CachedViews(plain, teacher_cache.load(cache_dir), cfg.data.split_seed)
    teacher, _ = load_teacher(cfg.distill.teacher_path)
    loaders = {
        "ce": DataLoader(plain, batch_size=BATCH, shuffle=True, drop_last=True),
        "cached": DataLoader(cached, batch_size=BATCH, drop_last=True,
                             sampler=ViewSampler(cached, 1, 0, num_replicas=1, rank=0)),
        "online": DataLoader(plain, batch_size=BATCH, shuffle=True, drop_last=True),
    }
    kd, ce = build_method(cfg.distill, "kd"), build_method(cfg.distill, "ce")
    states = {}
    for name in loaders:
        torch.manual_seed(0)
        model = build_model(STUDENT, 10)
        states[name] = (model, torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9), iter(loaders[name]))

    def step(name):
        model, opt, batches = states[name]
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            states[name] = (model, opt, iter(loaders[name]))
            batch = next(states[name][2])
        inputs, labels = batch[0], batch[1]
        if name == "ce":
            loss = ce.loss(model(inputs), None, labels)["loss"]
        else:
            if name == "online":
                with torch.no_grad():
                    logits = teacher(inputs)
            else:
                logits = batch[2]
            loss = kd.loss(model(inputs), logits, labels)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    times = {name: [] for name in loaders}
    for i in range(steps + 5):  # 5 warm-up rounds; the order rotates so drift hits all alike
        order = list(loaders)[i % 3:] + list(loaders)[:i % 3]
        for name in order:
            seconds = step(name)
            if i >= 5:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def plain_run(cfg: Config, epochs: int) -> dict:
    """Student-only training in a plain PyTorch loop, this process, the workers' thread count."""
    torch.set_num_threads(cfg.run.threads_per_worker)
    started = time.perf_counter()
    bundle = build_data(cfg.data, "student", cfg.run.seed)
    train = DataLoader(bundle.train, batch_size=BATCH, shuffle=True, drop_last=True)
    val = DataLoader(bundle.val, batch_size=BATCH * 2)
    torch.manual_seed(cfg.run.seed)
    model = build_model(STUDENT, bundle.num_classes)
    optimizer, scheduler = build_optimizer(model, cfg.optim, len(train), epochs)
    speeds = []
    for _ in range(epochs):
        model.train()
        t0, images = time.perf_counter(), 0
        for inputs, labels in train:
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            images += len(labels)
        speeds.append(images / (time.perf_counter() - t0))
        evaluate(model, val, device=torch.device("cpu"))
    return {"wall": time.perf_counter() - started, "speeds": speeds}


def b2_trainer(cfg: Config, name: str = "b2-student") -> dict:
    from kd_ray.cluster.stage import run_stage
    from kd_ray.runs.files import read_history

    started = time.time()
    result = run_stage(cfg, "student", name=name)
    history = read_history(result.run_dir)
    first = history[0]
    startup = first["time"] - started - first["perf/epoch_seconds"]
    return {"speeds": [h["perf/images_per_s"] for h in history], "startup": startup,
            "wall": time.time() - started}


def b2_ratio(cfg: Config) -> tuple[float, dict, list]:
    """Plain loop before and after the TorchTrainer run (drift hits both sides); steady state:
    the trainer's epochs after its first two, each plain block's after its first."""
    before = plain_run(cfg, 3)["speeds"]
    trainer = b2_trainer(cfg)
    after = plain_run(cfg, 3)["speeds"]
    plain = before[1:] + after[1:]
    return statistics.median(trainer["speeds"][2:]) / statistics.median(plain), trainer, plain


def b3_sweep(cfg: Config, name: str) -> dict:
    from kd_ray.cluster.tune import run_sweep

    started, t0 = time.perf_counter(), time.time()
    run_sweep(cfg.replace(run={"name": name}))
    return {"wall": time.perf_counter() - started, "started": t0, "dir": Path(cfg.run.storage) / name}


def trial_times(trial_dir: Path) -> dict:
    """One trial's (first attempt's) seconds: Ray start-up (its driver's start to the worker's
    loop), setup (data, cache, model, DDP), epochs (train + val + report), teardown (the last
    report to its driver's end; none for a trial ASHA stopped), and its epoch count."""
    marks = [json.loads(line) for line in (trial_dir / "timing.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (trial_dir / "metrics.jsonl").read_text().splitlines()]
    started = next(m["started"] for m in marks if "started" in m)
    finished = next((m["finished"] for m in marks if "finished" in m), None)
    first = next(r for r in rows if "perf/loop_started" in r)
    loop, setup = first["perf/loop_started"], first["perf/setup_seconds"]
    return {"start": started, "end": finished or rows[-1]["time"], "startup": loop - started,
            "setup": setup, "epochs_s": rows[-1]["time"] - loop - setup,
            "teardown": None if finished is None else finished - rows[-1]["time"], "epochs": len(rows),
            "top1": rows[-1]["val/top1"]}


def breakdown(sweep: dict) -> str:
    """Where the sweep's time went: before the first trial (Ray, the cache build), then per trial
    (medians) and the epochs trained in all."""
    trials = [trial_times(d) for d in sorted((sweep["dir"] / "trials").glob("trial-*"))]
    med = lambda key: statistics.median(t[key] for t in trials if t[key] is not None)  # noqa: E731
    before = min(t["start"] for t in trials) - sweep["started"]
    after = sweep["started"] + sweep["wall"] - max(t["end"] for t in trials)
    downs = [t["teardown"] for t in trials if t["teardown"] is not None]
    return (f"before the first trial {before:.1f}s (Ray, teacher cache); per trial (median of {len(trials)}): "
            f"start-up (trial start to its loop: Ray Train's, none in a Tune actor) {med('startup'):.1f}s, setup {med('setup'):.1f}s, epochs {med('epochs_s'):.1f}s, "
            f"teardown {statistics.median(downs) if downs else float('nan'):.1f}s; "
            f"{sum(t['epochs'] for t in trials)} epochs trained in all (8 full trials: "
            f"{8 * sweep['epochs']}); after the last trial {after:.1f}s (summary); final val/top1 of "
            f"the trials {sorted(round(t['top1'], 3) for t in trials)}")


def machine() -> str:
    import ray

    from kd_ray.deploy.bench import cpu_name

    return (f"{os.cpu_count()} CPU cores ({cpu_name()}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}")


def run_b1(storage: Path, teacher: Path, args, say) -> list:
    steps = 8 if args.quick else 30
    b1 = b1_steps(make_config(storage, teacher, 2048, 1), steps)
    r1, r1_online = b1["cached"] / b1["ce"], b1["online"] / b1["ce"]
    say(f"B1 step ms (median of {steps}): CE {1e3 * b1['ce']:.2f}, cached KD {1e3 * b1['cached']:.2f}, "
        f"online KD {1e3 * b1['online']:.2f}")
    return [("B1", "cached KD step / CE step", r1, "<= 1.05", r1 <= 1.05),
            ("B1 ref", "online KD step / CE step", r1_online, "-", None)]


def run_b2(storage: Path, teacher: Path, args, say) -> list:
    cfg = make_config(storage, teacher, 1024 if args.quick else 8192, 3 if args.quick else 8)
    cfg = cfg.replace(run={"runner": "train"})  # B2 times the TorchTrainer (START: the 1-task path)
    r2, trainer, plain = b2_ratio(cfg)
    say(f"B2 images/s per epoch: TorchTrainer {[round(s) for s in trainer['speeds']]} (first two are "
        f"warm-up), plain loop before/after {[round(s) for s in plain]}; TorchTrainer start-up "
        f"{trainer['startup']:.1f}s")
    return [("B2", "TorchTrainer img/s / plain loop img/s", r2, ">= 0.95", r2 >= 0.95)]


def b3_plain(storage: Path, teacher: Path, args, say) -> tuple[Config, dict]:
    """Epochs enough for one plain student run to last --min-plain-seconds; that run (once for
    B3 and B3-ASHA)."""
    from kd_ray.cluster.tune import trials_that_fit

    if "b3_plain" not in args:
        images = 1024 if args.quick else 8192
        probe = plain_run(make_config(storage, teacher, images, 1), 1)
        epochs = 2 if args.quick else max(2, math.ceil(args.min_plain_seconds / probe["wall"] * 1.1))
        cfg = make_config(storage, teacher, images, epochs)
        plain = plain_run(cfg, epochs)
        say(f"B3 plain student run: {epochs} epochs of {images} images, {plain['wall']:.1f}s; "
            f"sweep: 8 trials, {trials_that_fit(cfg)} at a time on {os.cpu_count()} cores")
        args.b3_plain = (cfg, plain)
    return args.b3_plain


def run_b3(storage: Path, teacher: Path, args, say) -> list:
    cfg, plain = b3_plain(storage, teacher, args, say)
    cached = b3_sweep(cfg, "b3-cached")
    cached["epochs"] = cfg.optim.epochs
    r3 = cached["wall"] / (8 * plain["wall"])
    say(f"B3 cached sweep (cache build included): {cached['wall']:.1f}s; {breakdown(cached)}")
    rows = [("B3", "cached sweep / 8 x plain run", r3, "<= 1.15", r3 <= 1.15)]
    if not args.skip_live:
        live = b3_sweep(cfg.replace(distill={"teacher_cache": "off"}), "b3-live")
        say(f"B3 live-teacher sweep: {live['wall']:.1f}s")
        rows.append(("B3 ref", "live-teacher sweep / 8 x plain run", live["wall"] / (8 * plain["wall"]), "-", None))
    return rows


def _empty_loop(config: dict) -> None:
    Path(config["mark"]).write_text(str(time.time()))


def run_floor(storage: Path, teacher: Path, args, say) -> list:
    """Ray Train's own start-up: a 1-worker TorchTrainer whose train function only notes the time,
    run twice (the second is warm); none of kd_ray's code runs in it."""
    import ray.train
    from ray.train.torch import TorchTrainer

    seconds = []
    for i in range(2):
        mark, t0 = storage / f"floor{i}.mark", time.time()
        TorchTrainer(_empty_loop, train_loop_config={"mark": str(mark)},
                     scaling_config=ray.train.ScalingConfig(num_workers=1),
                     run_config=ray.train.RunConfig(storage_path=str(storage), name=f"floor{i}")).fit()
        seconds.append((float(mark.read_text()) - t0, time.time() - t0))
    say("Ray Train floor (an empty train function, 1 worker): " + ", ".join(
        f"{loop:.1f}s to its loop, {total:.1f}s in all" for loop, total in seconds))
    return []


def run_start(storage: Path, teacher: Path, args, say) -> list:
    """A 1-worker stage's start-up, run_stage's call to its first epoch's start: one Ray task
    (run.runner auto, the default) against a TorchTrainer (train), each twice in turns (the job's
    second task finds its process and imports from the first)."""
    cfg = make_config(storage, teacher, 256, 1)
    seconds = {"auto": [], "train": []}
    for i in range(2):
        for runner in seconds:
            part = cfg.replace(run={"runner": runner})
            seconds[runner].append(b2_trainer(part, name=f"start-{runner}-{i}")["startup"])
    say("1-worker stage start-up: " + "; ".join(f"run.runner {runner} " + ", ".join(f"{s:.1f}s" for s in
                                                                                     times)
                                                for runner, times in seconds.items()))
    ratio = sum(seconds["auto"]) / sum(seconds["train"])
    return [("START", "1-worker stage start-up, one Ray task / TorchTrainer (2 runs each)", ratio,
             "<= 0.5", ratio <= 0.5)]


def run_b3a(storage: Path, teacher: Path, args, say) -> list:
    """ASHA on val/loss: on this synthetic data most trials reach 100% val/top1 within a few
    epochs, and ASHA lets every tie through its rungs; the top-1 sweep is the reference row."""
    cfg, plain = b3_plain(storage, teacher, args, say)
    sweeps = [("B3-ASHA", "val/loss", "min", "b3-asha")]
    if not args.skip_top1:
        sweeps.append(("B3-ASHA ref", "val/top1", "max", "b3-asha-top1"))
    rows = []
    for key, metric, mode, name in sweeps:
        asha = b3_sweep(cfg.replace(sweep={"scheduler": "asha", "metric": metric, "mode": mode}), name)
        asha["epochs"] = cfg.optim.epochs
        ratio = asha["wall"] / (8 * plain["wall"])
        say(f"{key} cached sweep with ASHA on {metric} (grace {cfg.sweep.grace_period}, factor "
            f"{cfg.sweep.reduction_factor:g}; cache build included): {asha['wall']:.1f}s; {breakdown(asha)}")
        target = key == "B3-ASHA"
        rows.append((key, f"cached ASHA sweep ({metric}) / 8 x plain run", ratio, "<= 0.6" if target else "-",
                     ratio <= 0.6 if target else None))
    return rows


def b4_epochs(storage: Path, teacher: Path, per_class: int, epochs: int) -> dict:
    """Images/s of whole epochs (data loading included), labels-only and cached KD interleaved."""
    torch.set_num_threads(1)
    folder = write_synthetic_imagefolder(storage / "b4_images", num_classes=10,
                                         per_class=(per_class, 2), image_size=96)
    cfg = Config.from_dict({
        "data": {"name": "imagefolder", "root": str(folder), "image_size": 32, "augment": True},
        "model": {"teacher": TEACHER, "student": STUDENT},
        "distill": {"loss": "kd", "teacher_path": str(teacher), "cache_views": 4},
        "optim": {"epochs": epochs, "batch_size": BATCH, "lr": 0.02},
        "run": {"storage": str(storage), "num_workers": 1, "threads_per_worker": 1},
    })
    cache_dir = storage / "b4_cache"
    teacher_cache.build(cfg, cache_dir)
    runs = {}
    for name, stage in (("ce", "student"), ("cached", "distill")):
        bundle = build_data(cfg.data, stage, 0)
        if name == "cached":
            bundle.train = CachedViews(bundle.train, teacher_cache.load(cache_dir), cfg.data.split_seed)
        loader, sampler, _ = make_loaders(bundle, BATCH, 0, 1, 0, 0)
        torch.manual_seed(0)
        step = TrainStep(build_model(STUDENT, 10), build_method(cfg.distill, "ce" if name == "ce" else "kd"))
        optimizer = torch.optim.SGD(step.parameters(), lr=0.02, momentum=0.9)
        runs[name] = (step, optimizer, loader, sampler)
    speeds = {name: [] for name in runs}
    for epoch in range(epochs + 1):  # epoch 0 warms both up; the order alternates
        for name in (list(runs) if epoch % 2 else list(runs)[::-1]):
            step, optimizer, loader, sampler = runs[name]
            sampler.set_epoch(epoch)
            sums = train_one_epoch(step, loader, optimizer, epoch=epoch + 1, device=torch.device("cpu"))
            if epoch:
                speeds[name].append(sums["images"] / sums["seconds"])
    return speeds


def run_b4(storage: Path, teacher: Path, args, say) -> list:
    per_class, epochs = (40, 2) if args.quick else (200, 10)  # 6 gave 0.94-1.08 in one day's runs
    speeds = b4_epochs(storage, teacher, per_class, epochs)
    ce, cached = statistics.median(speeds["ce"]), statistics.median(speeds["cached"])
    say(f"B4 epoch images/s ({10 * per_class} augmented 96 px PNGs at 32 px, {epochs} epochs each, "
        f"interleaved): labels-only {[round(s) for s in speeds['ce']]}, cached KD "
        f"{[round(s) for s in speeds['cached']]}")
    return [("B4", "cached KD epoch img/s / labels-only epoch img/s", cached / ce, ">= 0.97", cached / ce >= 0.97)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the script, not the speed")
    parser.add_argument("--only", default="B1,B2,START,FLOOR,B3,B3A,B4", help="comma-separated subset of "
                        "B1,B2,B3,B3A,B4 (and START: a 1-worker stage's start-up, one Ray task against a "
                        "TorchTrainer; FLOOR: Ray Train's start-up with an empty train function)")
    parser.add_argument("--note", default="", help="a line for the results file (e.g. what else ran)")
    parser.add_argument("--skip-live", action="store_true", help="skip the live-teacher reference sweep")
    parser.add_argument("--skip-top1", action="store_true", help="skip the ASHA-on-val/top1 reference sweep")
    parser.add_argument("--min-plain-seconds", type=float, default=60.0)
    parser.add_argument("--out", default=None, help="markdown file for the results (default "
                        "benchmarks/results.md when all of B1-B4 run; none with --quick)")
    args = parser.parse_args()
    from kd_ray.cluster.session import ensure_ray
    from kd_ray.cluster.tune import driver_cpus

    storage = Path(tempfile.mkdtemp(prefix="kd_ray_bench_kd_"))
    torch.manual_seed(0)
    teacher = storage / "teacher.pt"
    export_teacher(teacher, build_model(TEACHER, 10), TEACHER, [f"class{c}" for c in range(10)], 32)
    lines = []

    def say(text: str) -> None:
        lines.append(text)
        print(f"[bench_kd] {text}", flush=True)

    say(f"machine: {machine()}")
    say(f"teacher {TEACHER}, student {STUDENT}, 32 px synthetic, batch {BATCH}, 1 thread per worker")
    only = [name.strip().upper() for name in args.only.split(",")]
    rows = []
    if args.note:
        say(args.note)
    for name, bench in (("B1", run_b1), ("B4", run_b4), ("B2", run_b2), ("START", run_start), ("FLOOR", run_floor),
                        ("B3", run_b3), ("B3A", run_b3a)):
        if name in only:
            if name in ("B2", "START", "FLOOR", "B3", "B3A"):  # once, with room for the sweep's trial drivers (if any)
                cfg = make_config(storage, teacher, 64, 1)
                ensure_ray(cfg, extra_cpus=driver_cpus(cfg))
            rows += bench(storage, teacher, args, say)
    rows.sort(key=lambda row: row[0].split()[0])  # B1..B4, each with its reference rows
    table = ["| | ratio | value | target | met |", "|---|---|---:|---|---|"]
    table += [f"| {k} | {what} | {value:.3f} | {target} | {'-' if ok is None else 'yes' if ok else 'NO'} |"
              for k, what, value, target, ok in rows]
    print("\n".join(table), flush=True)
    out = args.out or (None if args.quick or not {"B1", "B2", "B3", "B3A", "B4"} <= set(only)
                       else "benchmarks/results.md")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(f"# bench_kd ({time.strftime('%Y-%m-%d %H:%M')}, `python scripts/bench_kd.py`)\n\n"
                             + "\n".join(f"- {line}" for line in lines) + "\n\n" + "\n".join(table) + "\n")
        history = append_history(Path(out).parent / "history.csv", lines[0].removeprefix("machine: ")
                                 + (f"; {args.note}" if args.note else ""),
                                 [(f"{k}: {what}", f"{value:.3f}", "" if target == "-" else target)
                                  for k, what, value, target, _ in rows])
        print(f"[bench_kd] wrote {out}, appended to {history}")


if __name__ == "__main__":
    main()
