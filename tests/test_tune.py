"""Sweep pieces that need no Ray: search space, checks, summary table, best.yaml, plot."""
import json
from types import SimpleNamespace

import pytest
import yaml

from kd_ray.config import Config, load_config
from kd_ray.errors import ConfigError, KdRayError, NonFiniteLossError
from kd_ray.cluster.tune import search_space, trial_error, trial_results, trials_that_fit
from kd_ray.config.sweep import apply_params
from kd_ray.runs.stages import check_sweep
from kd_ray.runs.sweep_report import plot_sweep, trial_rows, write_sweep_report

SPACE = {"distill.temperature": [1, 4], "distill.alpha": {"choice": [0.5, 0.9]},
         "optim.lr": {"loguniform": [0.001, 0.1]}}


def sweep_cfg(tmp_path, **sweep):
    return Config.from_dict({
        "data": {"name": "synthetic", "synthetic_size": 64, "image_size": 8},
        "model": {"teacher": "simple_cnn", "student": "tiny_cnn"},
        "distill": {"loss": "ce"}, "optim": {"epochs": 3},
        "run": {"name": "sw", "storage": str(tmp_path)},
        "sweep": {"space": SPACE, **sweep},
    })


def test_search_space_maps_each_kind_to_tune(tmp_path):
    from ray import tune
    from ray.tune.search.sample import Categorical, Float

    space = search_space(sweep_cfg(tmp_path))
    assert space["distill.temperature"] == tune.grid_search([1, 4])
    assert isinstance(space["distill.alpha"], Categorical) and space["distill.alpha"].categories == [0.5, 0.9]
    assert isinstance(space["optim.lr"], Float) and (space["optim.lr"].lower, space["optim.lr"].upper) == (0.001, 0.1)
    optuna = search_space(sweep_cfg(tmp_path, search="optuna"))
    assert isinstance(optuna["distill.temperature"], Categorical)  # Optuna has no grid


def test_apply_params_sets_values_and_checks_them(tmp_path):
    cfg = apply_params(sweep_cfg(tmp_path), {"distill.temperature": 8, "optim.lr": 0.01})
    assert (cfg.distill.temperature, cfg.optim.lr) == (8.0, 0.01)
    with pytest.raises(ConfigError, match="alpha"):
        apply_params(cfg, {"distill.alpha": 1.5})


@pytest.mark.parametrize("space, message", [
    ({}, "sweep.space is empty"),
    ({"distill.temprature": [1, 2]}, "not a config key"),
    ({"sweep.seed": [1, 2]}, "not a config key"),
    ({"distill.alpha": 0.5}, "must be a list of values"),
    ({"distill.alpha": {"uniform": [0.9]}}, r"needs \[low, high\]"),
    ({"distill.alpha": {"normal": [0, 1]}}, "must be a list of values or one of"),
    ({"optim.lr": {"loguniform": [0, 1]}}, "loguniform needs low > 0"),
    ({"distill.alpha": [0.5, 2.0]}, "distill.alpha"),
    ({"distill.loss": ["kd", "no_such_loss"]}, "no_such_loss"),
])
def test_bad_search_spaces_are_refused_on_the_driver(tmp_path, space, message):
    with pytest.raises(ConfigError, match=message):
        raw = sweep_cfg(tmp_path).to_dict()
        raw["sweep"]["space"] = space
        check_sweep(Config.from_dict(raw), train_teacher=True)


def test_a_trial_that_cannot_fit_is_refused(monkeypatch, tmp_path):
    import ray

    cfg = sweep_cfg(tmp_path).replace(run={"num_workers": 4})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0})
    with pytest.raises(ConfigError, match=r"one trial needs 4.01 CPU .* cluster has 3"):
        trials_that_fit(cfg)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 9.0})
    assert trials_that_fit(cfg) == 2
    assert trials_that_fit(cfg.replace(sweep={"max_concurrent_trials": 1})) == 1
    # 1 worker: the trial trains in its own actor, with no driver's share beside it
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert trials_that_fit(cfg.replace(run={"num_workers": 1})) == 2
    assert trials_that_fit(cfg.replace(run={"num_workers": 1}, sweep={"trial_runner": "train"})) == 1


def write_history(folder, accs):
    folder.mkdir(parents=True)
    rows = [{"epoch": e, "val/top1": a} for e, a in enumerate(accs, start=1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake_results(tmp_path, runs):
    """Tune-like results: (name, T, alpha, accuracies per epoch, error)."""
    results = []
    for name, t, a, accs, error in runs:
        write_history(tmp_path / "sw" / "trials" / name, accs)
        results.append(SimpleNamespace(path=str(tmp_path / "sw" / "tune" / name), error=error,
                                       config={"distill.temperature": t, "distill.alpha": a},
                                       metrics={"epoch": len(accs), "val/top1": accs[-1]} if accs else {}))
    return results


def test_summary_sorts_by_the_final_metric_and_names_stop_reasons(tmp_path):
    cfg = sweep_cfg(tmp_path, space={"distill.temperature": [1, 4], "distill.alpha": [0.5, 0.9]})
    results = fake_results(tmp_path, [
        ("trial-a", 1, 0.5, [0.2, 0.5, 0.6], None),
        ("trial-b", 4, 0.5, [0.3, 0.8, 0.7], None),   # best epoch 2, final 0.7
        ("trial-c", 1, 0.9, [0.1], None),              # stopped after epoch 1
        ("trial-d", 4, 0.9, [0.4], RuntimeError("boom")),
    ])
    sweep_dir, table = write_sweep_report(cfg, tmp_path / "sw", trial_results(cfg, results))
    rows = trial_rows(cfg, sweep_dir, [{"name": r.path.split("/")[-1], "params": r.config, "error": None}
                                       for r in results])
    assert [r["trial"] for r in rows][:2] == ["trial-b", "trial-a"]
    lines = (sweep_dir / "summary.md").read_text().splitlines()
    assert lines[2].startswith("| trial-b | 4 | 0.50 | 3 | 2 | 80.00 | 70.00 | completed |")
    assert "stopped early by ASHA after epoch 1" in table and "error: boom" in table
    assert len((sweep_dir / "summary.csv").read_text().splitlines()) == 5
    best = load_config(sweep_dir / "best.yaml")  # `kd-ray distill -c best.yaml` reads it as is
    assert (best.distill.temperature, best.distill.alpha, best.run.name) == (4.0, 0.5, "sw-best")
    assert "sweep" not in yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert (sweep_dir / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_every_trial_failed_raises_the_first_error(tmp_path):
    cfg = sweep_cfg(tmp_path, space={"distill.temperature": [1, 4]})
    failure = RuntimeError("Ray wrapper")
    failure.__cause__ = NonFiniteLossError("loss is nan at epoch 2, step 0; lower optim.lr")
    results = fake_results(tmp_path, [("trial-a", 1, None, [0.3], failure),  # failed in epoch 2
                                      ("trial-b", 4, None, [], RuntimeError("second"))])
    with pytest.raises(KdRayError, match=r"every trial .* failed; the first error: loss is nan at epoch 2"):
        write_sweep_report(cfg, tmp_path / "sw", trial_results(cfg, results))
    assert trial_error(SimpleNamespace(error=None)) is None
    assert not (tmp_path / "sw" / "best.yaml").exists()


def test_continuous_space_is_plotted_as_a_scatter(tmp_path):
    cfg = sweep_cfg(tmp_path, space={"distill.temperature": {"uniform": [1, 8]},
                                     "distill.alpha": {"uniform": [0.1, 0.9]}})
    rows = [{"T": t, "alpha": a, "final val/top1": acc} for t, a, acc in
            [(1.5, 0.2, 50.0), (6.0, 0.8, 70.0), (3.0, 0.5, None)]]
    assert plot_sweep(cfg, rows, tmp_path / "scatter.png")
    assert (tmp_path / "scatter.png").stat().st_size > 1000
    assert not plot_sweep(cfg, [{"T": 1, "alpha": 0.1, "final val/top1": None}], tmp_path / "none.png")


def test_an_epoch_only_tune_heard_of_is_counted(tmp_path):
    """Tune may stop a trial right after its last report, before metrics.jsonl got the line."""
    cfg = sweep_cfg(tmp_path, space={"distill.temperature": [1]})
    write_history(tmp_path / "sw" / "trials" / "trial-a", [0.2, 0.4])
    last = {"epoch": 3, "val/top1": 0.5}
    [row] = trial_rows(cfg, tmp_path / "sw", [{"name": "trial-a", "params": {}, "error": None, "last": last}])
    assert (row["epochs"], row["final val/top1"], row["stop"]) == (3, 50.0, "completed")


def test_optuna_search_without_optuna_names_the_extra(monkeypatch, tmp_path):
    import sys

    from kd_ray.cluster.tune import make_tuner

    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 4.0})
    with pytest.raises(ConfigError, match=r"pip install 'kd_ray\[optuna\]'"):
        make_tuner(sweep_cfg(tmp_path, search="optuna"), tmp_path / "sw")


def test_asha_judges_no_trial_during_its_warm_up():
    from kd_ray.cluster.tune import grace_epochs

    assert grace_epochs(load_config()) == 2  # the default 1-epoch warm-up, then one epoch
    assert grace_epochs(load_config(overrides=["optim.warmup_epochs=0"])) == 1
    assert grace_epochs(load_config(overrides=["optim.warmup_epochs=2.5", "sweep.grace_period=1"])) == 4
    assert grace_epochs(load_config(overrides=["optim.warmup_epochs=0", "sweep.grace_period=3"])) == 3
    assert grace_epochs(load_config(overrides=["optim.epochs=1"])) == 1  # never past the budget


def test_the_choice_reads_validation_only_never_the_test_split(tmp_path):
    """auto and tune choose on val: a trial with the better test top-1 but the worse val top-1
    is not chosen, and the test column is reported beside it."""
    from kd_ray.cluster.auto import best_trial

    cfg = sweep_cfg(tmp_path, space={"distill.temperature": [1, 4]})
    for name, val, test in (("trial-a", 0.6, 0.99), ("trial-b", 0.7, 0.10)):
        folder = tmp_path / "sw" / "trials" / name
        folder.mkdir(parents=True)
        rows = [{"epoch": e, "val/top1": val - 0.1 * (3 - e)} for e in (1, 2, 3)]
        rows[-1]["test/top1"] = test
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trials = [{"name": n, "params": {"distill.temperature": t}, "error": None, "last": None}
              for n, t in (("trial-a", 1), ("trial-b", 4))]
    rows = trial_rows(cfg, tmp_path / "sw", trials)
    assert [r["trial"] for r in rows] == ["trial-b", "trial-a"]
    assert [r["test/top1"] for r in rows] == [pytest.approx(10.0), pytest.approx(99.0)]
    assert best_trial(cfg, tmp_path / "sw", trials) == "trial-b"
