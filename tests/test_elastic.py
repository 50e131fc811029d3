"""run.num_workers: [min, max], an elastic worker group, checked without starting Ray."""
import pytest

from kd_ray.config import load_config
from kd_ray.config.checks import check_machine
from kd_ray.errors import ConfigError


def test_min_max_is_an_elastic_group_and_equal_bounds_are_a_fixed_count():
    run = load_config(overrides=["run.num_workers=[1, 4]"]).run
    assert (run.elastic, run.min_workers, run.max_workers) == (True, 1, 4)
    run = load_config(overrides=["run.num_workers=[2, 2]"]).run
    assert (run.elastic, run.num_workers) == (False, 2)
    assert load_config(overrides=["run.num_workers=3"]).run.max_workers == 3


@pytest.mark.parametrize("value", ["[2, 1]", "[0, 2]", "[1]", "[1, 2, 3]", "[true, 2]", "[1.5, 2]", "0"])
def test_bad_worker_counts_are_one_line_naming_the_form(value):
    with pytest.raises(ConfigError, match=r"run.num_workers must be a positive integer"):
        load_config(overrides=[f"run.num_workers={value}"])


def test_the_trainer_gets_ray_trains_elastic_scaling_config(tmp_path):
    from kd_ray.cluster.stage import make_trainer

    cfg = load_config(overrides=["run.num_workers=[1, 2]", "run.resize_interval_s=5", "data.name=synthetic"])
    scaling = make_trainer(cfg, "teacher", str(tmp_path), "e", []).scaling_config
    assert scaling.num_workers == (1, 2) and scaling.elasticity_enabled
    assert (scaling.min_workers, scaling.max_workers, scaling.elastic_resize_monitor_interval_s) == (1, 2, 5)
    fixed = make_trainer(load_config(overrides=["data.name=synthetic"]), "teacher", str(tmp_path), "f", [])
    assert fixed.scaling_config.num_workers == 2 and not fixed.scaling_config.elasticity_enabled


def test_an_elastic_run_needs_only_its_minimum_on_this_machine(monkeypatch):
    from kd_ray.config import checks

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(checks, "machine_counts", lambda gpus: (2, 0))
    check_machine(load_config(overrides=["run.num_workers=[2, 8]"]))  # starts with 2, grows on a cluster
    with pytest.raises(ConfigError, match=r"needs 3 CPUs but this machine has 2"):
        check_machine(load_config(overrides=["run.num_workers=[3, 8]"]))


def test_a_sweep_refuses_an_elastic_group_before_ray():
    from kd_ray.runs.stages import check_sweep

    cfg = load_config(overrides=["run.num_workers=[1, 2]", "sweep.space={distill.temperature: [1, 2]}"])
    with pytest.raises(ConfigError, match=r"a sweep's trials take a fixed worker count"):
        check_sweep(cfg, train_teacher=False)


def test_the_trainer_starts_no_ray_data_machinery(tmp_path):
    """No Ray Datasets in our runs: Ray's datasets callback (a DatasetManager actor per worker
    group, ray.data imported on every worker) is left out; Ray's other callbacks stay."""
    from kd_ray.cluster.stage import DatasetsCallback, make_trainer

    trainer = make_trainer(load_config(overrides=["data.name=synthetic"]), "teacher", str(tmp_path), "d", [])
    kinds = {type(cb).__name__ for cb in trainer._create_default_callbacks()}
    assert DatasetsCallback is not None and DatasetsCallback.__name__ not in kinds
    assert {"BackendSetupCallback", "PlacementGroupCleanerCallback"} <= kinds
