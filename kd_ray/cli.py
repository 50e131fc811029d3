"""The ``kd-ray`` command line: parse, call the library, print one-line errors, set exit codes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kd_ray.errors import KdRayError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
STAGE_COMMANDS = {"train-teacher": "teacher", "train-student": "student", "distill": "distill"}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    p.add_argument("--args-file", help="the original project's commandline_args.txt (JSON flags)")


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
    from kd_ray.submit import add_arguments as submit_arguments

    submit_arguments(sub.add_parser(
        "submit", help="run a kd-ray command as a Ray job on a cluster and follow its logs",
        usage="kd-ray submit [--address URL] [--head-dir DIR] COMMAND -c config.yaml [--set ...]",
        description="Runs COMMAND as a Ray job with this checkout as its working directory; "
                    "relative config paths resolve against a folder on the head (--head-dir). "
                    "Options of submit go before COMMAND."))
    return parser


def _load(args):
    from kd_ray.config import load_config, read_args_file

    cfg = load_config(args.config, args.overrides, args.args_file)
    stages = read_args_file(args.args_file)[1] if args.args_file else {}
    return cfg, stages


def run(args) -> int:
    if args.command == "submit":
        from kd_ray.submit import submit_command

        return submit_command(args)
    if args.command in STAGE_COMMANDS:
        from kd_ray.launch import run_stage

        cfg, _ = _load(args)
        result = run_stage(cfg, STAGE_COMMANDS[args.command], new=args.new)
        top1 = result.summary["final"].get("val/top1")
        print(f"[kd_ray] done: val top-1 {100 * top1:.2f}% after {result.summary['epochs']} epochs; "
              f"results in {result.run_dir}")
        if "teacher_file" in result.summary:
            print(f"[kd_ray] teacher exported to {result.summary['teacher_file']}")
        return 0
    if args.command == "tune":
        from kd_ray.tune import resume_sweep, run_sweep

        if args.resume:
            if args.config or args.overrides or args.train_teacher:
                raise KdRayError("--resume takes only the sweep folder: the sweep keeps its config")
            sweep_dir, table = resume_sweep(args.resume)
        else:
            cfg, stages = _load(args)
            sweep_dir, table = run_sweep(cfg, args.train_teacher or stages.get("train_teacher", False))
        print(f"\nSweep results ({sweep_dir}):\n{table}\n[kd_ray] best config: {sweep_dir}/best.yaml "
              f"(kd-ray distill -c {sweep_dir}/best.yaml); heatmap: {sweep_dir}/heatmap.png; "
              f"TensorBoard: tensorboard --logdir {sweep_dir}", flush=True)
        return 0
    if args.command == "cache-teacher":
        from kd_ray.teacher_cache import cache_teacher

        cfg, _ = _load(args)
        path, manifest = cache_teacher(cfg, args.out)
        print(f"[kd_ray] teacher cache ready: {path} ({manifest['rows']} rows, {manifest['samples']} "
              f"images x {manifest['views']} view(s)); use it with --set distill.teacher_cache={path}")
        return 0
    if args.command in ("pipeline", "demo"):
        from kd_ray.config import load_config
        from kd_ray.pipeline import run_pipeline

        if args.command == "demo":
            if not DEMO_CONFIG.is_file():
                raise KdRayError(f"{DEMO_CONFIG} not found: run the demo from a checkout of kd_ray")
            cfg, stages = load_config(DEMO_CONFIG, args.overrides), {}
        else:
            cfg, stages = _load(args)
        root, table = run_pipeline(cfg, stages.get("train_teacher", True), stages.get("distill", True))
        print(f"\nResults ({root}):\n{table}")
        return 0
    if args.command == "report":
        from kd_ray.report import find_runs, write_report

        out = args.out or args.run_dirs[0]
        print(write_report(out, find_runs(args.run_dirs)))
        print(f"[kd_ray] wrote {out}/comparison.md, comparison.csv and accuracy.png")
        return 0
    if args.command == "convert":
        from kd_ray.data import convert_imagefolder_to_parquet

        rows = convert_imagefolder_to_parquet(args.src, args.dst, tuple(args.splits.split(",")))
        for split, count in rows.items():
            print(f"[kd_ray] {split}: {count} images -> {Path(args.dst) / (split + '.parquet')}")
        return 0
    raise AssertionError(args.command)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KdRayError as exc:
        print(f"kd-ray: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ not in ("RunFailedError", "TrainingFailedError", "WorkerGroupError",
                                      "ControllerError"):
            raise
        lines = [line for line in str(exc).splitlines() if line.strip()]
        print(f"kd-ray: error: training failed: {lines[-1] if lines else repr(exc)} (full log above; "
              "finished epochs are kept: rerun the same command to resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kd-ray: interrupted; rerun the same command to resume from the last epoch", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
