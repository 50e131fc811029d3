"""What `kd-ray auto` searches and refuses, on the driver (no Ray)."""
import pytest

from kd_ray.cluster.auto import final_seeds
from kd_ray.config import load_config
from kd_ray.errors import ConfigError
from kd_ray.runs.auto_plan import candidates, check_auto, short, trial_config


def test_candidates_spread_the_budget_over_the_methods_in_a_seeded_order():
    picked = candidates(["kd", "dkd", "dist"], 7, seed=0)
    methods = [p["distill.loss"] for p in picked]
    assert methods == ["kd", "dkd", "dist", "kd", "dkd", "dist", "kd"]  # round robin
    assert picked == candidates(["kd", "dkd", "dist"], 7, seed=0)
    assert picked != candidates(["kd", "dkd", "dist"], 7, seed=1)
    assert len({short(p) for p in picked}) == 7  # no setting twice
    assert len(candidates(["mse_logits"], 50)) == 3  # a small grid ends the search early
    dist = next(p for p in picked if p["distill.loss"] == "dist")
    assert dist["distill.params.beta"] == dist["distill.params.gamma"] and "distill.temperature" in dist


def test_every_built_in_distillation_method_has_a_grid_of_its_own_keys():
    """Not the plugin fallback (temperature only): ctkd learns its T, mlkd sums fixed ones, crd and
    reviewkd are weighed by their own params."""
    from kd_ray.methods import METHODS, method_class
    from kd_ray.runs.auto_plan import _grid

    for name in METHODS.names():
        if method_class(name).teacher is None:
            continue
        grid = _grid(name)
        assert len(grid) >= 3 and len({short({"distill.loss": name, **g}) for g in grid}) == len(grid), name
        if name in ("ctkd", "mlkd", "crd", "reviewkd", "fitnets", "at"):
            assert "distill.temperature" not in grid[0], name
    assert set(_grid("mlkd")[0]) == {"distill.params.kd_weight"} and set(_grid("ctkd")[0]) == {"distill.alpha"}


def test_a_candidate_keeps_its_methods_own_params_and_its_values():
    cfg = load_config(overrides=["distill.method_params={dkd: {warmup: 1}}"])
    trial = trial_config(cfg, {"distill.loss": "dkd", "distill.temperature": 2.0, "distill.params.beta": 8.0})
    assert trial.distill.loss == "dkd" and trial.distill.temperature == 2.0
    assert trial.distill.params == {"warmup": 1, "beta": 8.0}


def test_bad_auto_input_is_refused_in_one_line():
    cfg = load_config()
    with pytest.raises(ConfigError, match="--seeds must be >= 2"):
        check_auto(cfg, ["kd"], 4, seeds=1)
    with pytest.raises(ConfigError, match="--budget"):
        check_auto(cfg, ["kd"], 0, seeds=3)
    with pytest.raises(ConfigError, match="uses no teacher"):
        check_auto(cfg, ["ce"], 4, seeds=3)
    with pytest.raises(ConfigError, match="distill.method_params.at"):
        check_auto(cfg, ["at"], 4, seeds=3)
    with pytest.raises(ConfigError, match="nope"):
        check_auto(cfg, ["nope"], 4, seeds=3)
    assert len(check_auto(cfg, ["kd", "dist"], 4, seeds=3)) == 4


def test_final_seeds_continue_run_seeds():
    assert final_seeds([0], 3) == [0, 1, 2]
    assert final_seeds([5, 7], 3) == [5, 7, 8]
    assert final_seeds([0, 1, 2, 3], 2) == [0, 1]
