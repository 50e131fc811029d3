"""The ``kd-ray`` command line: parse, check what needs no torch or Ray, call the library, print
one-line errors, set exit codes.

Heavy layers (torch, Ray) are imported inside ``run`` only, after the config and its paths
passed their checks: ``kd-ray --help`` and bad input answer in a fraction of a second.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

from kd_ray import log as kd_log
from kd_ray.config import demo_config, load_config, read_args_file
from kd_ray.config.checks import check_machine, check_paths
from kd_ray.cli_parser import STAGE_COMMANDS, build_parser  # noqa: F401 (build_parser: tests, docs)
from kd_ray.config.describe import describe
from kd_ray.errors import (KdRayError, RayStartError, RunFailedError, RunInterrupted, RunsFailedError,
                           TeacherError, one_line, user_error_in)
from kd_ray.runs.lock import RunLock, fresh_name
from kd_ray.storage import location, storage_root

log = kd_log.get("cli")
SWEEP_FIX = "wait for it to finish, or pick another run.name"
INTERRUPTED = "interrupted; rerun the same command to resume"
TERMINATED = "stopped by SIGTERM; rerun the same command to resume"


def _load(args, stages=("teacher", "student", "distill")):
    """The config and the args file's stage flags, with the paths checked (no torch, no Ray yet)."""
    if args.command == "demo":
        cfg, flags = load_config(demo_config(), args.overrides), {}
    else:
        cfg = load_config(args.config, args.overrides, args.args_file)
        flags = read_args_file(args.args_file)[1] if args.args_file else {}
    check_paths(cfg, stages)
    check_machine(cfg)  # a local instance: no more workers than this machine holds
    return cfg, flags


def _run_folder(cfg):
    """<run.storage>/<run.name>: a local folder, or a folder in object storage."""
    return location(storage_root(cfg.run.storage)) / cfg.run.name


def run(args) -> int:
    # Imports below are local on purpose: each command pays only for the layers it uses, and the
    # checks that need torch (runs.stages: data, teacher file) run before Ray is imported
    # (torch takes ~4 s to import here, Ray ~7 s more).
    if args.command == "config":
        print(describe(load_config(args.config, args.overrides, args.args_file)), end="", flush=True)
        return 0
    if args.command == "submit":
        from kd_ray.cluster.submit import submit_command  # local: heavy, see above

        return submit_command(args)
    if args.command in STAGE_COMMANDS:
        stage = STAGE_COMMANDS[args.command]
        cfg, _ = _load(args, (stage,))
        storage = storage_root(cfg.run.storage)
        name = fresh_name(storage, cfg.run.name) if args.new else cfg.run.name
        with RunLock(location(storage) / name):  # one driver per run: taken before torch or Ray load
            from kd_ray.runs.stages import preflight  # local: heavy, see above

            cfg = preflight(cfg, stage)
            from kd_ray.cluster.stage import run_stage  # local: heavy, see above

            result = run_stage(cfg, stage, name=name, checked=True)
        top1 = result.summary["final"].get("val/top1")
        log.info(f"done: val top-1 {100 * top1:.2f}% after {result.summary['epochs']} epochs; "
                 f"results in {result.run_dir}")
        if "teacher_file" in result.summary:
            log.info(f"teacher exported to {result.summary['teacher_file']}")
        return 0
    if args.command == "tune":
        if args.resume:
            if args.config or args.overrides or args.train_teacher:
                raise KdRayError("--resume takes only the sweep folder: the sweep keeps its config")
            if not location(args.resume).is_dir():
                raise KdRayError(f"{args.resume} holds no sweep to resume (no such folder): pass the "
                                 "folder `kd-ray tune` printed")
            with RunLock(args.resume, "sweep", SWEEP_FIX):
                from kd_ray.cluster.tune import resume_sweep  # local: heavy, see above

                sweep_dir, table = resume_sweep(args.resume)
        else:
            cfg, flags = _load(args)
            train_teacher = args.train_teacher or flags.get("train_teacher", False)
            with RunLock(_run_folder(cfg), "sweep", SWEEP_FIX):
                from kd_ray.runs.stages import check_sweep  # local: heavy, see above

                cfg = check_sweep(cfg, train_teacher)
                from kd_ray.cluster.tune import run_sweep  # local: heavy, see above

                sweep_dir, table = run_sweep(cfg, train_teacher, checked=True)
        print(f"\nSweep results ({sweep_dir}):\n{table}", flush=True)
        log.info(f"best config: {sweep_dir}/best.yaml (kd-ray distill -c {sweep_dir}/best.yaml); "
                 f"heatmap: {sweep_dir}/heatmap.png; TensorBoard: tensorboard --logdir {sweep_dir}")
        return 0
    if args.command == "auto":
        cfg, _ = _load(args)
        methods = [m for item in args.methods for m in item.split(",") if m]
        with RunLock(_run_folder(cfg), "auto", "wait for it to finish, or pick another run.name"):
            from kd_ray.runs.auto_plan import prepare  # local: heavy, see above

            cfg, found = prepare(cfg, methods, args.budget, args.seeds)
            from kd_ray.cluster.auto import run_auto  # local: heavy, see above

            root, text = run_auto(cfg, found, args.seeds, args.margin)
        print(f"\n{text}\n", flush=True)
        log.info(f"verdict in {root}/verdict.md (plot: verdict.png); the chosen setting: "
                 f"kd-ray distill -c {root}/best.yaml")
        return 0
    if args.command == "cache-teacher":
        cfg, _ = _load(args, ("distill",))
        from kd_ray.runs.stages import check_cache_teacher  # local: heavy, see above

        cfg = check_cache_teacher(cfg)
        from kd_ray.cluster.cache import cache_teacher  # local: heavy, see above

        path, manifest = cache_teacher(cfg, args.out, checked=True)
        log.info(f"teacher cache ready: {path} ({manifest['rows']} rows, {manifest['samples']} "
                 f"images x {manifest['views']} view(s)); use it with --set distill.teacher_cache={path}")
        return 0
    if args.command == "import-teacher":
        cfg, _ = _load(args, ())
        if not Path(args.weights).expanduser().is_file():  # before torch is imported
            raise TeacherError(f"weights file {args.weights} not found; give a local weights file "
                               "(.pt, .pth, .ckpt, .safetensors)")
        if args.image_size is not None and args.image_size <= 0:
            raise KdRayError(f"--image-size must be a positive integer, got {args.image_size}")
        from kd_ray.runs.imported import import_teacher, parse_triple  # local: heavy, see above

        path, top1 = import_teacher(cfg, args.arch, args.weights, args.out, args.image_size,
                                    parse_triple(args.mean, "mean"), parse_triple(args.std, "std"),
                                    args.prefix)
        log.info(f"teacher {args.arch}: val top-1 {100 * top1:.2f}%; exported to {path} "
                 f"(use it with --set distill.teacher_path={path})")
        return 0
    if args.command in ("pipeline", "demo", "compare"):
        cfg, flags = _load(args)
        # A teacher file in distill.teacher_path (e.g. from import-teacher) is used, not retrained.
        stages = flags.get("train_teacher", not cfg.distill.teacher_path), flags.get("distill", True)
        methods = [m for item in args.methods for m in item.split(",") if m] \
            if args.command == "compare" else None
        with RunLock(_run_folder(cfg), "pipeline", "wait for it to finish, or pick another run.name"):
            from kd_ray.runs.stages import check_pipeline  # local: heavy, see above

            check_pipeline(cfg, *stages, methods)
            from kd_ray.cluster.pipeline import run_pipeline  # local: heavy, see above

            try:
                root, table = run_pipeline(cfg, *stages, checked=True, methods=methods)
            except RunsFailedError as exc:  # the others finished: their table first, then the error
                print(f"\nResults ({exc.root}):\n{exc.table}", flush=True)
                raise
        print(f"\nResults ({root}):\n{table}", flush=True)
        return 0
    if args.command == "report":
        from kd_ray.runs.report import find_runs, write_report  # local: heavy, see above

        out = args.out or args.run_dirs[0]
        print(write_report(out, find_runs(args.run_dirs)), flush=True)
        log.info(f"wrote {out}/comparison.md, comparison.csv, accuracy.png and tradeoff.png")
        return 0
    if args.command in ("export", "eval", "predict", "bench"):
        from kd_ray.deploy.commands import run_deploy  # local: heavy, see above

        code = run_deploy(args)
        if args.command == "export" and code == 0:  # run.tracker=mlflow: the file as an artifact
            from kd_ray.runs.tracking import log_export

            log_export(args.run_dir, args.out, args.which)
        return code
    if args.command == "convert":
        from kd_ray.data.parquet import convert_imagefolder_to_parquet  # local: heavy, see above

        rows = convert_imagefolder_to_parquet(args.src, args.dst, tuple(args.splits.split(",")),
                                              shard_mb=args.shard_mb)
        for split, count in rows.items():
            shards = len(list((Path(args.dst) / split).glob("part-*.parquet")))
            log.info(f"{split}: {count} images -> {Path(args.dst) / split}/ ({shards} shard(s))")
        return 0
    raise AssertionError(args.command)


class Sigterm:
    """SIGTERM (a preempted node, a scheduler's stop, ``kill``) is a stop, not a crash: it goes
    where Ctrl-C goes. During training that is the stage's SIGINT handler (the first asks every
    rank to stop after the epoch's checkpoint, a second SIGTERM or Ctrl-C stops at once);
    elsewhere Python's, which raises KeyboardInterrupt. ``received`` makes the exit code 143."""

    def __init__(self):
        self.received = False

    def __call__(self, signum, frame):
        if not self.received:
            log.warning("SIGTERM: stopping as on Ctrl-C")
        self.received = True
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # SIGINT ignored or not ours to call: stop at once
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # main() called by a thread
            yield self
            return
        before = signal.signal(signal.SIGTERM, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, before)

    def stopped(self) -> tuple[str, int]:
        return (TERMINATED, 143) if self.received else (INTERRUPTED, 130)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    kd_log.configure()
    with Sigterm().installed() as sigterm:
        return _main(args, sigterm)


def _main(args, sigterm: Sigterm) -> int:
    try:
        return run(args)
    except KdRayError as exc:
        print(f"kd-ray: error: {one_line(user_error_in(exc) or exc)}", file=sys.stderr)
        return 2
    except RunFailedError as exc:
        print(f"kd-ray: error: training failed: {one_line(exc)} (full log above; finished epochs "
              "are kept: rerun the same command to resume)", file=sys.stderr)
        return 1
    except RayStartError as exc:
        print(f"kd-ray: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except RunInterrupted as exc:  # the first Ctrl-C (or SIGTERM): stopped after an epoch's checkpoint
        why, code = sigterm.stopped()
        print(f"kd-ray: {why} ({one_line(exc)})", file=sys.stderr)
        return code
    except KeyboardInterrupt:  # the second Ctrl-C, or one before training started
        why, code = sigterm.stopped()
        print(f"kd-ray: {why} from the last checkpoint", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
