"""The chaos suite (tests/chaos_scenarios.py) as tests: T1-T15 and T19 of docs/failures.md (T16-T17: tests/test_cluster.py).

Each scenario is a real Ray Train run (2 workers; in T4, T7, T8D, T8E, T8G, T10, T14 one, in one Ray task; T12 one TorchTrainer worker) on the session's Ray instance, with a fault
injected through KD_RAY_FAULTS or a process killed from outside. What must hold is written once,
as the checks of each scenario's Row (scripts/chaos.py prints the same rows with their figures).
"""
import os

import pytest

import chaos_scenarios as chaos

pytestmark = [pytest.mark.chaos, pytest.mark.ray]


def check(row: chaos.Row) -> None:
    assert not row.failed, f"{row.test} ({row.scenario}): failed {row.failed}; figures {row.figures}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("chaos")


@pytest.fixture(scope="module")
def env(ray_cluster):
    return dict(os.environ, **chaos.RAY_ENV, RAY_ADDRESS=ray_cluster, PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def t1(work, env):
    return chaos.t1_worker_raises(work, env)


@pytest.fixture(scope="module")
def t3(work, env):
    return chaos.t3_worker_killed(work, env)


@pytest.fixture(scope="module")
def t8(work, env):
    return chaos.t8_bad_input(work, env)


def test_t1_worker_error_restarts_once_and_reruns_at_most_one_epoch(t1):
    check(t1)
    assert t1.figures["restarts"] == 1 and t1.figures["epochs re-run"] <= 1


def test_t2_worker_failing_every_attempt_uses_three_attempts_and_shows_the_error(work, env):
    row = chaos.t2_fails_every_attempt(work, env)
    check(row)
    assert row.figures["attempts"] == 3 and row.figures["exit"] == 1


def test_t3_sigkilled_worker_loses_at_most_one_epoch(t3):
    check(t3)
    assert t3.figures["s kill -> training"] > 0


def test_t4_killed_driver_resumes_at_epoch_3(work, env):
    check(chaos.t4_driver_killed(work, env))


def test_t5_resumed_sweep_reruns_no_finished_trial(work, env):
    row = chaos.t5_sweep_killed(work, env)
    check(row)
    assert row.figures["finished trials rerun"] == 0


def test_t6_stalled_rank_fails_the_attempt_within_the_timeout(work, env):
    row = chaos.t6_rank_stalls(work, env)
    check(row)
    assert row.figures["s stall -> attempt failed"] <= chaos.STALL_TIMEOUT_S + chaos.STALL_MARGIN_S


def test_t7_truncated_checkpoint_falls_back_to_the_previous_one(work, env):
    check(chaos.t7_truncated_checkpoint(work, env))


@pytest.mark.parametrize("case", range(7), ids=["missing-teacher", "class-count", "renamed-classes",
                                                 "corrupt-image", "zero-byte-image", "nan-loss",
                                                 "planted-collapse"])
def test_t8_bad_input_exits_2_without_retries(t8, case):
    row = t8[case]
    check(row)
    assert row.figures["exit"] == 2 and row.figures["retries"] == 0


def test_t9_tensorboard_has_one_point_per_epoch_after_restarts(t1, t3):
    check(chaos.t9_tensorboard([t1, t3]))


def test_t10_second_driver_is_refused_and_a_dead_owner_is_taken_over(work, env):
    row = chaos.t10_two_drivers(work, env)
    check(row)
    assert row.figures["duplicate epochs"] == 0 and row.figures["lineages"] == 1


def test_t11_more_workers_than_the_machine_is_refused_before_ray(work, env):
    check(chaos.t11_oversized_workers(work, env))


def test_t12_non_ascii_run_name_trains_in_a_folder_named_as_written(work, env):
    check(chaos.t12_non_ascii_name(work, env))


@pytest.mark.parametrize("case", range(4), ids=["storage-under-a-file", "dot-dot-name", "long-name",
                                                 "empty-config"])
def test_t13_bad_names_and_paths_exit_2_before_ray(work, env, case):
    check(chaos.t13_bad_names_and_paths(work, env)[case])


def test_t14_ctrl_c_stops_after_the_epoch_and_twice_at_once(work, env):
    row = chaos.t14_ctrl_c(work, env)
    check(row)
    assert row.figures["exit after 1 Ctrl-C"] == 130


def test_t15_sigterm_mid_epoch_checkpoints_there_exits_143_and_resumes_at_its_step(work, env):
    check(chaos.t15_sigterm_mid_epoch(work, env))


@pytest.fixture(scope="module")
def t19(work, env):
    return chaos.t19_full_disk_and_cut_short_cache(work, env)


@pytest.mark.parametrize("case", range(2), ids=["full-disk", "cut-short-cache"])
def test_t19_full_disk_and_cut_short_cache_exit_2_once_leaving_nothing_half_written(t19, case):
    check(t19[case])
