"""The ``kd-ray`` command line: parse, check what needs no torch or Ray, call the library, print
one-line errors, set exit codes.

Heavy layers (torch, Ray) are imported inside ``run`` only, after the config and its paths
passed their checks: ``kd-ray --help`` and bad input answer in a fraction of a second.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kd_ray import log as kd_log
from kd_ray.config import demo_config, load_config, read_args_file
from kd_ray.config.checks import check_machine, check_paths
from kd_ray.errors import KdRayError, RayStartError, RunFailedError, RunInterrupted, one_line, user_error_in
from kd_ray.runs.lock import RunLock, fresh_name

STAGE_COMMANDS = {"train-teacher": "teacher", "train-student": "student", "distill": "distill"}
log = kd_log.get("cli")
SWEEP_FIX = "wait for it to finish, or pick another run.name"
INTERRUPTED = "interrupted; rerun the same command to resume"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable (section.key.name=value sets one "
                        "entry of a mapping, e.g. distill.params.beta=2)")
    p.add_argument("--args-file", help="the original project's commandline_args.txt (JSON flags)")


def _submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the head's dashboard URL (default: $RAY_API_SERVER_ADDRESS "
                   "or $RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument("--head-dir", help="folder on the head that relative paths in the config "
                   "(run.storage, data.root, distill.teacher_path) resolve against (default: "
                   "$KD_RAY_HEAD_DIR on the head, else ~/kd_ray_jobs)")
    p.add_argument("--python", help="interpreter on the head (default: $KD_RAY_PYTHON on the head, "
                   "else `python` on its PATH)")
    p.add_argument("--no-wait", action="store_true", help="submit and return without following")
    p.add_argument("job_command", metavar="COMMAND",
                   help="the kd-ray command to run: train-teacher, distill, pipeline, tune, ...")
    p.add_argument("job_args", nargs=argparse.REMAINDER, metavar="...",
                   help="its arguments, as for a local run (-c config.yaml --set ...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd-ray", description="Knowledge distillation on Ray Train.")
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"train-teacher": "train the teacher and export teacher.pt",
             "train-student": "train the student on labels only (the baseline)",
             "distill": "train the student from the teacher in distill.teacher_path",
             "pipeline": "teacher, then baseline and distilled students per seed, then a comparison"}
    for name, text in helps.items():
        stage = sub.add_parser(name, help=text, description=text)
        _config_args(stage)
        if name in STAGE_COMMANDS:
            stage.add_argument("--new", action="store_true",
                               help="run.name exists: start a fresh run beside it (<name>-2) instead of resuming")
    tune = sub.add_parser("tune", help="Ray Tune sweep of distillation (sweep section of the config)",
                          description="Sweep sweep.space (e.g. distill.temperature, distill.alpha); "
                          "every trial is a distributed distillation run.")
    _config_args(tune)
    tune.add_argument("--train-teacher", action="store_true",
                      help="train the teacher first (once), instead of using distill.teacher_path")
    tune.add_argument("--resume", metavar="SWEEP_DIR", help="finish an interrupted sweep")
    cache = sub.add_parser("cache-teacher", help="compute the teacher's logits once into a Parquet cache",
                           description="Runs distill.teacher_path over the training set (K augmented "
                           "views per image with data.augment) on Ray workers; distill runs and sweep "
                           "trials then read the logits instead of running the teacher.")
    _config_args(cache)
    cache.add_argument("--out", help="cache folder (default: distill.teacher_cache if a folder, "
                       "else <run.storage>/teacher_cache)")
    demo = sub.add_parser("demo", help="the pipeline on the shipped MNIST subset, 3 seeds")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    report = sub.add_parser("report", help="remake the comparison table and plot from finished runs")
    report.add_argument("run_dirs", nargs="+", help="run folders or pipeline folders")
    report.add_argument("-o", "--out", help="where to write (default: the first folder given)")
    convert = sub.add_parser("convert", help="convert an ImageFolder tree to Parquet tables")
    convert.add_argument("src", help="folder with train/ and val/ class folders")
    convert.add_argument("dst", help="folder for <split>.parquet")
    convert.add_argument("--splits", default="train,val")
    _submit_args(sub.add_parser(
        "submit", help="run a kd-ray command as a Ray job on a cluster and follow its logs",
        usage="kd-ray submit [--address URL] [--head-dir DIR] COMMAND -c config.yaml [--set ...]",
        description="Runs COMMAND as a Ray job with this checkout as its working directory; "
                    "relative config paths resolve against a folder on the head (--head-dir). "
                    "Options of submit go before COMMAND."))
    return parser


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


def _folder(storage: str, name: str):
    """The run or sweep folder to lock (a URI stays a string: runs.lock does not lock those yet)."""
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else Path(storage).expanduser() / name


def run(args) -> int:
    # Imports below are local on purpose: each command pays only for the layers it uses, and the
    # checks that need torch (runs.stages: data, teacher file) run before Ray is imported
    # (torch takes ~4 s to import here, Ray ~7 s more).
    if args.command == "submit":
        from kd_ray.cluster.submit import submit_command  # local: heavy, see above

        return submit_command(args)
    if args.command in STAGE_COMMANDS:
        stage = STAGE_COMMANDS[args.command]
        cfg, _ = _load(args, (stage,))
        storage = Path(cfg.run.storage).expanduser().resolve()
        name = fresh_name(storage, cfg.run.name) if args.new else cfg.run.name
        with RunLock(_folder(cfg.run.storage, name)):  # one driver per run, before torch or Ray load
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
            if not Path(args.resume).is_dir():
                raise KdRayError(f"{args.resume} holds no sweep to resume (no such folder): pass the "
                                 "folder `kd-ray tune` printed")
            with RunLock(args.resume, "sweep", SWEEP_FIX):
                from kd_ray.cluster.tune import resume_sweep  # local: heavy, see above

                sweep_dir, table = resume_sweep(args.resume)
        else:
            cfg, flags = _load(args)
            train_teacher = args.train_teacher or flags.get("train_teacher", False)
            with RunLock(_folder(cfg.run.storage, cfg.run.name), "sweep", SWEEP_FIX):
                from kd_ray.runs.stages import check_sweep  # local: heavy, see above

                cfg = check_sweep(cfg, train_teacher)
                from kd_ray.cluster.tune import run_sweep  # local: heavy, see above

                sweep_dir, table = run_sweep(cfg, train_teacher, checked=True)
        print(f"\nSweep results ({sweep_dir}):\n{table}", flush=True)
        log.info(f"best config: {sweep_dir}/best.yaml (kd-ray distill -c {sweep_dir}/best.yaml); "
                 f"heatmap: {sweep_dir}/heatmap.png; TensorBoard: tensorboard --logdir {sweep_dir}")
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
    if args.command in ("pipeline", "demo"):
        cfg, flags = _load(args)
        stages = flags.get("train_teacher", True), flags.get("distill", True)
        with RunLock(_folder(cfg.run.storage, cfg.run.name), "pipeline",
                     "wait for it to finish, or pick another run.name"):
            from kd_ray.runs.stages import check_pipeline  # local: heavy, see above

            check_pipeline(cfg, *stages)
            from kd_ray.cluster.pipeline import run_pipeline  # local: heavy, see above

            root, table = run_pipeline(cfg, *stages, checked=True)
        print(f"\nResults ({root}):\n{table}", flush=True)
        return 0
    if args.command == "report":
        from kd_ray.runs.report import find_runs, write_report  # local: heavy, see above

        out = args.out or args.run_dirs[0]
        print(write_report(out, find_runs(args.run_dirs)), flush=True)
        log.info(f"wrote {out}/comparison.md, comparison.csv and accuracy.png")
        return 0
    if args.command == "convert":
        from kd_ray.data.parquet import convert_imagefolder_to_parquet  # local: heavy, see above

        rows = convert_imagefolder_to_parquet(args.src, args.dst, tuple(args.splits.split(",")))
        for split, count in rows.items():
            log.info(f"{split}: {count} images -> {Path(args.dst) / (split + '.parquet')}")
        return 0
    raise AssertionError(args.command)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    kd_log.configure()
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
    except RunInterrupted as exc:  # the first Ctrl-C: stopped after an epoch's checkpoint
        print(f"kd-ray: {INTERRUPTED} ({one_line(exc)})", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # the second Ctrl-C, or one before training started
        print(f"kd-ray: {INTERRUPTED} from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
