"""Methods with state of their own on Ray. `fitnets` on 2 workers (live teacher, a trainable
regressor in DDP with the student), its driver SIGKILLed in epoch 3, the same command again: the
run resumes from epoch 3 with the regressor of the epoch-2 checkpoint on every rank, not a fresh
one. crd, reviewkd, ctkd and mlkd: the same resume on two gloo ranks running the Ray workers'
loop, without Ray (the Ray path is the same for every method; a Train run costs ~20 CPU s here)."""
import json
import os

import pytest
import torch

import chaos_scenarios as chaos
import gloo
import method_ranks
from kd_ray.engine import checkpoints
from kd_ray.runs.files import read_history
from kd_ray.testing.faults import read_events, state_digest


def test_fitnets_on_two_workers_resumes_with_its_regressor(ray_cluster, tmp_path):
    env = dict(os.environ, **chaos.RAY_ENV, RAY_ADDRESS=ray_cluster, PYTHONUNBUFFERED="1")
    teacher = chaos.make_teacher(tmp_path / "teacher.pt", [f"class{i}" for i in range(10)])
    argv = ["distill", *chaos.settings(tmp_path, "fit", "optim.epochs=3", f"distill.teacher_path={teacher}",
                                       "distill.loss=fitnets", "distill.params.student_layer=4",
                                       "distill.params.teacher_layer=4", "distill.params.weight=5",
                                       "distill.teacher_cache=auto")]
    faults_dir, run_dir = tmp_path / "faults", tmp_path / "fit"
    chaos.kill_driver_after_epoch_2(argv, env, run_dir, faults_dir)
    assert len(read_history(run_dir)) == 2, "the first run did not reach epoch 2"

    out = chaos.kd_ray(argv, env, faults_dir, chaos.HOLD_EPOCH_3, inline=True)  # the same command again
    assert out.code == 0, out.err
    assert "[kd_ray] resuming fit from epoch 3 " in out.out
    assert out.out.count("reads teacher features: the teacher runs live") == 1  # said once, no cache
    assert chaos.logged_epochs(run_dir) == [1, 2, 3]
    assert not (tmp_path / "teacher_cache").exists()

    saved = next(f for f in checkpoints.folders(run_dir) if checkpoints.read_manifest(f)["epoch"] == 2)
    state = torch.load(saved / checkpoints.STATE_FILE, map_location="cpu", weights_only=False)
    assert set(state["method"]) == {"regressor.0.weight", "regressor.0.bias", "regressor.1.weight", "regressor.1.bias",
                                    "regressor.1.running_mean", "regressor.1.running_var",
                                    "regressor.1.num_batches_tracked"}  # ConvReg: 1x1 conv, BN, ReLU
    assert tuple(state["method"]["regressor.0.weight"].shape) == (16, 16, 1, 1)
    attempts = [e for e in read_events(faults_dir) if e["event"] == "attempt"]
    fresh = [e["method_state"] for e in attempts if e["start_epoch"] == 1]
    resumed = [e["method_state"] for e in attempts if e["start_epoch"] == 3]
    assert len(fresh) == 2 and len(resumed) == 2  # both ranks, each attempt
    assert all(digest == state_digest(state["method"]) for digest in resumed)  # restored on every rank
    assert all(digest != resumed[0] for digest in fresh)  # and it had trained: not the initial weights
    history = read_history(run_dir)
    assert all(row["train/hint"] > 0 for row in history)  # the hint loss is logged every epoch


# The new methods' extras: what each checkpoint must hold (names, and for crd the banks' sizes).
NEW_METHODS = {
    "crd": (["distill.params.student_layer=7", "distill.params.teacher_layer=7", "distill.params.nce_k=64",
             "distill.params.feat_dim=16"],
            {"memory_s", "memory_t", "z", "embed_s.linear.weight", "embed_t.linear.weight"}),
    "reviewkd": (["distill.params.student_layers=['1','4']", "distill.params.mid_channels=8"],
                 {"abfs.0.conv1.0.weight", "abfs.0.attention_conv.0.weight", "abfs.1.conv2.0.weight"}),
    "ctkd": (["distill.teacher_cache=auto"], {"theta"}),
    "mlkd": (["distill.teacher_cache=auto"], set()),
}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Each new method on two gloo ranks running the Ray workers' loop (tests/method_ranks.py):
    2 epochs, then the same run with 3, which resumes from the epoch-2 checkpoint. All four in one
    pair of spawned ranks (a spawn costs seconds); ctkd and mlkd read a teacher cache."""
    from kd_ray import cache as teacher_cache
    from kd_ray.cluster.stage import make_loop_config
    from kd_ray.config import load_config

    work = tmp_path_factory.mktemp("methods")
    teacher = chaos.make_teacher(work / "teacher.pt", [f"class{i}" for i in range(10)])
    jobs, runs = [], {}
    for method, (extra, _) in sorted(NEW_METHODS.items()):
        sets = [*chaos.SYNTHETIC, f"distill.teacher_path={teacher}", f"distill.loss={method}", *extra]
        if "distill.teacher_cache=auto" in extra:
            cache = work / f"{method}-cache"
            teacher_cache.build(load_config(overrides=sets), cache)
            sets.append(f"distill.teacher_cache={cache}")
        faults = work / f"{method}-faults"
        for epochs in (2, 3):
            cfg = load_config(overrides=[*sets, f"optim.epochs={epochs}"])
            jobs.append({**make_loop_config(cfg, "distill", str(work), method),
                         "faults": {"dir": str(faults), "faults": []}})
        runs[method] = (work / method, faults, (len(jobs) - 2, len(jobs) - 1))
    gloo.spawn_two(method_ranks.run_jobs, work, jobs, str(work))
    errors = {i: [json.loads((work / f"rank{r}-{i}.json").read_text())["error"] for r in (0, 1)]
              for i in range(len(jobs))}
    return {method: (run_dir, faults, [e for i in ids for e in errors[i] if e])
            for method, (run_dir, faults, ids) in runs.items()}


@pytest.mark.parametrize("method", sorted(NEW_METHODS))
def test_new_method_on_two_workers_resumes_with_its_extras_on_every_rank(method, resumed):
    """crd (memory banks and heads), reviewkd (the fusion modules), ctkd (the learnt temperature)
    and mlkd (no state of its own): 2 ranks, 2 epochs, then the same run with 3 resumes from
    epoch 3 with the epoch-2 checkpoint's method state on both ranks."""
    _, must_have = NEW_METHODS[method]
    run_dir, faults_dir, errors = resumed[method]
    assert errors == [], errors[0]
    assert chaos.logged_epochs(run_dir) == [1, 2, 3]
    saved = next(f for f in checkpoints.folders(run_dir) if checkpoints.read_manifest(f)["epoch"] == 2)
    state = torch.load(saved / checkpoints.STATE_FILE, map_location="cpu", weights_only=False)["method"]
    assert must_have <= set(state), sorted(state)
    attempts = [e for e in read_events(faults_dir) if e["event"] == "attempt"]
    fresh = [e["method_state"] for e in attempts if e["start_epoch"] == 1]
    resumed_states = [e["method_state"] for e in attempts if e["start_epoch"] == 3]
    assert len(fresh) == 2 and len(resumed_states) == 2  # both ranks, each attempt
    assert all(digest == state_digest(state) for digest in resumed_states)  # restored on every rank
    if state:
        assert all(digest != resumed_states[0] for digest in fresh)  # and it had trained
    assert all(row["train/loss"] > 0 for row in read_history(run_dir))
