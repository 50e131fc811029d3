"""Kill workers, drivers and sweeps, feed bad input, and print what each failure cost.

Runs the chaos suite (tests/chaos_scenarios.py: T1-T14 of docs/failures.md) on a
local Ray instance of its own, with 2 workers on small synthetic data, and prints a table of
figures. Exit code 0 when every check passed. About 7 minutes on 2 idle CPU cores.

    python scripts/chaos.py [--only T1,T3,T9] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # kd_ray, and the scenarios beside the tests

import chaos_scenarios as chaos  # noqa: E402

os.environ.update(chaos.RAY_ENV)


def table(rows: list[chaos.Row]) -> str:
    """Markdown: one line per scenario, its figures, and pass or the checks that failed."""
    def show(value):
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    lines = ["| test | scenario | figures | result |", "|---|---|---|---|"]
    for row in rows:
        figures = "; ".join(f"{k} {show(v)}" for k, v in row.figures.items())
        result = "pass" if not row.failed else "FAIL: " + ", ".join(row.failed)
        lines.append(f"| {row.test} | {row.scenario} | {figures.replace('|', '/')} | {result} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated tests, e.g. T1,T3,T9")
    parser.add_argument("--keep", help="write runs here and keep them (default: a temporary folder)")
    args = parser.parse_args()
    wanted = set(args.only.upper().split(",")) if args.only else None
    work = Path(args.keep or tempfile.mkdtemp(prefix="kd_ray_chaos_")).resolve()
    work.mkdir(parents=True, exist_ok=True)

    from kd_ray import log
    from kd_ray.cluster.session import start_local_ray

    log.configure()

    context = start_local_ray(num_cpus=5, object_store_memory=256 * 2**20, dashboard_host="127.0.0.1",
                              include_dashboard=True, log_to_driver=False)
    env = dict(os.environ, RAY_ADDRESS=context.address_info["gcs_address"], PYTHONUNBUFFERED="1")
    rows, started = [], time.perf_counter()
    try:
        for scenario in chaos.SCENARIOS:
            test = scenario.__name__.split("_")[0].upper()
            if wanted and test not in wanted:
                continue
            print(f"[chaos] {test}: {scenario.__doc__ or scenario.__name__}".splitlines()[0], flush=True)
            try:
                result = scenario(work, env)
            except Exception as exc:  # one broken scenario must not hide the others' figures
                traceback.print_exc()
                result = chaos.Row(test, scenario.__name__, {}, {f"ran ({type(exc).__name__})": False})
            rows += result if isinstance(result, list) else [result]
        restarted = [row for row in rows if row.test in ("T1", "T3") and row.run_dir]
        if restarted and (not wanted or "T9" in wanted):
            rows.append(chaos.t9_tensorboard(restarted))
    finally:
        import ray

        ray.shutdown()  # only the instance this script started
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nkd_ray chaos suite: 2 workers, synthetic data, {os.cpu_count()} CPU cores, "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print(table(rows))
    return 0 if all(not row.failed for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
