"""The deploy commands behind the CLI (export, eval, predict, bench): call, print, exit code."""
from __future__ import annotations

import sys

from kd_ray import log as kd_log

log = kd_log.get("cli")


def run_deploy(args) -> int:
    if args.command == "export":
        from kd_ray.deploy.export import export  # local: heavy

        path, report = export(args.run_dir, args.format, args.out, args.which, args.tolerance)
        if "max_abs_diff" in report:
            log.info(f"checked on a batch of {report['checked_batch']}: max |{args.format} - PyTorch| "
                     f"= {report['max_abs_diff']:.3g} (tolerance {args.tolerance:g})")
        log.info(f"wrote {path} and {path.name}.json")
        return 0
    if args.command == "eval":
        cfg = None
        if args.config or args.overrides or args.args_file:
            from kd_ray.config import load_config

            cfg = load_config(args.config, args.overrides, args.args_file)
        from kd_ray.deploy.evaluate import evaluate_target, summary_lines  # local: heavy

        metrics, folder, _ = evaluate_target(args.model, cfg, args.split, args.out, args.which)
        print("\n".join(summary_lines(metrics)), flush=True)
        log.info(f"wrote {folder}/metrics.json, per_class.csv, predictions.csv, confusion.png, "
                 "reliability.png")
        return 0
    if args.command == "predict":
        from kd_ray.deploy.predict import as_csv, as_json, predict, table, write_atomic

        rows, bad = predict(args.model, args.images, args.top_k)
        if rows:
            print(table(rows), flush=True)
        if args.csv:
            write_atomic(args.csv, as_csv(rows))
        if args.json:
            write_atomic(args.json, as_json(rows, bad))
        for path, why in bad:
            print(f"kd-ray: error: cannot read image {path}: {why}", file=sys.stderr)
        return 2 if bad else 0
    if args.command == "bench":
        from kd_ray.deploy.bench import bench_command  # local: heavy

        return bench_command(args)
    raise AssertionError(args.command)
