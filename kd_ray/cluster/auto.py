"""``kd-ray auto``: does distillation help on this data, with which method and settings, beyond
seed noise?

One teacher (trained once, or distill.teacher_path) and one teacher cache; a Tune search with ASHA
over method x temperature x the method's main weight, chosen on the validation split; then the
chosen setting and the labels-only student on K seeds, read once on the test split; then the
verdict (runs.verdict). Every step is a resumable run folder under <storage>/<run.name>/: a rerun
of the same command picks up where it stopped.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from ray import tune

from kd_ray.cluster.cache import resolve_cache
from kd_ray.cluster.session import ensure_ray
from kd_ray.cluster.stage import run_stage
from kd_ray.cluster.trial import fit_tuner
from kd_ray.cluster.tune import TUNE_DIR, asha, grace_epochs, run_trial, trial_error, trials_that_fit
from kd_ray.config import Config
from kd_ray.errors import ConfigError
from kd_ray.log import get
from kd_ray.runs.auto_plan import short, trial_config
from kd_ray.runs.files import read_history
from kd_ray.runs.sweep_report import TRIALS_DIR, trial_rows, write_sweep_report
from kd_ray.runs.verdict import make_verdict, write_verdict
from kd_ray.storage import location, storage_root

log = get(__name__)
CHOSEN_FILE = "chosen.json"  # the search's outcome: a rerun goes straight to the final runs


def run_auto(cfg: Config, found: list, seeds: int, margin: float) -> tuple[Path, str]:
    started = time.perf_counter()
    root = location(storage_root(cfg.run.storage)) / cfg.run.name
    ensure_ray(cfg)
    if not cfg.distill.teacher_path:
        teacher = run_stage(cfg, "teacher", storage=str(root), name="teacher")
        cfg = cfg.replace(distill={"teacher_path": teacher.summary["teacher_file"]})
    cfg = resolve_cache(cfg, root / "teacher_cache")  # every trial and final run reads it
    searched = time.perf_counter()
    chosen = search(cfg, found, root / "search")
    finals = time.perf_counter()
    best = trial_config(cfg, chosen["params"])
    base_runs, distilled_runs, plain_seconds = [], [], None
    seed_list = final_seeds(cfg.run.seeds, seeds)
    for seed in seed_list:
        tic = time.perf_counter()
        base_runs.append(run_stage(cfg.replace(run={"seed": seed}), "student", storage=str(root / "final"),
                                   name=f"student-seed{seed}").summary)
        plain_seconds = plain_seconds or time.perf_counter() - tic
        distilled_runs.append(run_stage(best.replace(run={"seed": seed}), "distill",
                                        storage=str(root / "final"), name=f"distill-seed{seed}").summary)
    verdict = make_verdict([100 * test_of(s) for s in base_runs], [100 * test_of(s) for s in distilled_runs],
                           margin, seed_list)
    write_best(root, best, chosen, base_runs[0]["seed"])
    done = time.perf_counter()
    total = done - started
    cost = {"wall time (this command)": f"{total / 60:.1f} min",
            "teacher and cache": f"{(searched - started) / 60:.1f} min",
            "search (the only step `kd-ray pipeline` with these seeds would not run)":
                f"{(finals - searched) / 60:.1f} min: {chosen['trials']} trials, "
                f"{chosen['trial_epochs']} trial-epochs",
            f"final runs ({2 * seeds}, one after another)": f"{(done - finals) / 60:.1f} min",
            "one labels-only run (wall, as `kd-ray train-student` runs it)": f"{plain_seconds / 60:.1f} min",
            "cost / one labels-only run": f"{total / plain_seconds:.1f}x"}
    text = write_verdict(root, verdict, chosen["label"], cost)
    return root, text


def final_seeds(seeds: list, count: int) -> list:
    """run.seeds, continued with the next integers, to ``count`` seeds."""
    out = list(dict.fromkeys(seeds))[:count]
    while len(out) < count:
        out.append(max(out) + 1)
    return out


def test_of(summary: dict) -> float:
    value = summary.get("final", {}).get("test/top1")
    if value is None:  # a run trained before the test split existed
        raise ConfigError(f"run {summary.get('run')} has no test top-1: delete its folder and rerun")
    return value


def search(cfg: Config, found: list, folder: Path) -> dict:
    """The best candidate on the validation split (Tune, ASHA); kept in chosen.json."""
    done = folder / CHOSEN_FILE
    if done.is_file():
        chosen = json.loads(done.read_text())
        log.info(f"search already finished: chose {chosen['label']} ({folder})")
        return chosen
    trial_cfg = cfg.replace(run={"num_workers": 1})  # 1-worker trials train in their Tune actors
    keys = list(dict.fromkeys(k for params in found for k in params))
    report_cfg = trial_cfg.replace(sweep={"space": {k: sorted({str(p.get(k)) for p in found}) for k in keys}})
    log.info(f"auto search: {len(found)} settings ({'; '.join(map(short, found))}), "
             f"{cfg.optim.epochs} epochs each at most, ASHA on {cfg.sweep.metric} (grace "
             f"{grace_epochs(cfg)} epochs); results in {folder}")
    results = fit_tuner(tuner(trial_cfg, found, folder))
    trials = [{"name": Path(r.path).name, "params": r.config["candidate"], "error": trial_error(r),
               "last": r.metrics} for r in results]
    write_sweep_report(report_cfg, folder, trials)  # summary.md/.csv; fails if every trial did
    best_name = best_trial(report_cfg, folder, trials)
    params = next(t["params"] for t in trials if t["name"] == best_name)
    epochs = sum(len(read_history(folder / TRIALS_DIR / t["name"])) for t in trials)
    chosen = {"params": params, "label": short(params), "trial": best_name, "trials": len(trials),
              "trial_epochs": epochs}
    done.write_text(json.dumps(chosen, indent=2))
    return chosen


def best_trial(cfg: Config, folder: Path, trials: list) -> str:
    """The first trial of the sweep table (best final validation metric; failed trials never
    count), so that the table and the choice agree."""
    final = f"final {cfg.sweep.metric}"
    rows = [r for r in trial_rows(cfg, folder, trials) if not r["stop"].startswith("error") and r[final] is not None]
    return rows[0]["trial"]


def run_candidate(params: dict, base: dict, sweep_dir: str) -> None:
    """The Tune trainable: one candidate, applied over its method's method_params."""
    cfg = trial_config(Config.from_dict(base), params["candidate"])
    return run_trial({}, cfg.to_dict(), sweep_dir)


def tuner(cfg: Config, found: list, folder: Path):
    trainable = tune.with_resources(tune.with_parameters(run_candidate, base=cfg.to_dict(), sweep_dir=str(folder)),
                                    {"CPU": cfg.run.cpus_per_worker})
    if (folder / TUNE_DIR).exists() and tune.Tuner.can_restore(str(folder / TUNE_DIR)):
        log.info(f"resuming the search in {folder}")
        return tune.Tuner.restore(str(folder / TUNE_DIR), trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable, param_space={"candidate": tune.grid_search(found)},
        tune_config=tune.TuneConfig(metric=cfg.sweep.metric, mode=cfg.sweep.mode, scheduler=asha(cfg),
                                    max_concurrent_trials=trials_that_fit(cfg), reuse_actors=True,
                                    trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}"),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(folder), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures)))


def write_best(root: Path, best: Config, chosen: dict, seed: int) -> None:
    """best.yaml: `kd-ray distill -c best.yaml` trains the final distilled run of the first seed."""
    raw = best.replace(run={"name": f"{best.run.name}-best", "seed": seed}).to_dict()
    raw.pop("sweep")
    (root / "best.yaml").write_text(
        f"# kd-ray auto chose {chosen['label']} (search trial {chosen['trial']}); reproduce the first "
        "seed's final distilled run with: kd-ray distill -c best.yaml\n" + yaml.safe_dump(raw, sort_keys=False))
