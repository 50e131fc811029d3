"""Ray runs with run.storage on a real S3-compatible server (moto on 127.0.0.1): a killed driver's
rerun resumes from the checkpoint in the bucket, and a 2-trial sweep (1-worker trials) writes its
summary there.
The kd-ray drivers are subprocesses joining the session's Ray instance; they forward the AWS_*
variables to the workers (cluster.session)."""
import json

import chaos_scenarios as chaos
from kd_ray.cluster.tune import STARTS_FILE
from kd_ray.config import load_config
from kd_ray.engine import checkpoints
from kd_ray.runs.files import read_history
from kd_ray.storage import location
from kd_ray.testing.faults import ENV

BASE = [s for s in chaos.SYNTHETIC if not s.startswith("distill.teacher_cache")]


def teacher_in(bucket: str) -> str:
    path = f"{bucket}/teacher.pt"
    chaos.make_teacher(path, [f"class{i}" for i in range(10)])
    return path


def test_distill_on_s3_resumes_after_the_driver_is_killed(cli_env, s3_server, s3_bucket, tmp_path):
    env = dict(cli_env, **s3_server)  # the kd-ray driver passes the AWS_* variables to its workers
    storage, name = f"{s3_bucket}/runs", "s3kd"
    run = location(storage) / name
    argv = ["distill"]
    for item in [*BASE, "optim.epochs=3", f"run.storage={storage}", f"run.name={name}",
                 f"distill.teacher_path={teacher_in(s3_bucket)}"]:
        argv += ["--set", item]
    plan = chaos.kill_driver_after_epoch_2(argv, env, run, tmp_path / "faults")
    assert [h["epoch"] for h in read_history(run)] == [1, 2]
    assert checkpoints.latest(run)[1]["epoch"] == 2  # the checkpoint is in the bucket
    out = chaos.kd_ray(argv, dict(env, **{ENV: plan}), timeout=600)
    assert out.code == 0, out.err[-3000:]
    assert f"[kd_ray] resuming {name} from epoch 3 " in out.out
    assert chaos.logged_epochs(run) == [1, 2, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["checkpoint"].startswith(f"{storage}/{name}/checkpoint_")
    assert (location(storage) / "teacher_cache" / "manifest.json").is_file()
    assert run.glob("tensorboard") and (run / "tensorboard").glob("events.out.tfevents.*")
    report = chaos.kd_ray(["report", str(run)], env, inline=True)
    assert report.code == 0 and (run / "comparison.md").read_text().startswith("| model")


def test_sweep_on_s3_writes_its_summary_there(cli_env, s3_server, s3_bucket, tmp_path):
    config = tmp_path / "sweep.yaml"
    storage = f"{s3_bucket}/sweeps"
    # 1-worker trials, each in its Tune actor (a 2-worker run on S3: the test above).
    load_config(overrides=[*BASE, "run.num_workers=1", "optim.epochs=1", f"distill.teacher_path={teacher_in(s3_bucket)}",
                           "run.name=s3sweep", f"run.storage={storage}",
                           "sweep.space={distill.temperature: [1, 4]}", "sweep.scheduler=none"]).save(config)
    out = chaos.kd_ray(["tune", "-c", str(config)], dict(cli_env, **s3_server), timeout=600)
    assert out.code == 0, out.err[-3000:]
    sweep = location(storage) / "s3sweep"
    assert (sweep / "summary.md").read_text().count("| trial-") == 2
    assert (sweep / "best.yaml").is_file() and (sweep / "sweep.yaml").is_file()
    trials = (sweep / "trials").glob("trial-*")
    assert len(trials) == 2 and all(read_history(t) for t in trials)
    # Tune resumes from the bucket: every trial finished, so none runs again.
    again = chaos.kd_ray(["tune", "--resume", str(sweep)], dict(cli_env, **s3_server), timeout=600)
    assert again.code == 0, again.err[-3000:]
    assert "2 of 2 trials finished and kept" in again.out + again.err
    assert all(len((t / STARTS_FILE).read_text().splitlines()) == 1 for t in trials)
