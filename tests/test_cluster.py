"""Cluster jobs: cluster.yaml and Dockerfile checks, `kd-ray submit` paths, and two real clusters.

The clusters run as subprocesses (never ray.init in this process, which the session fixture owns),
with their own short temp dir (Unix socket paths must stay under ~107 characters) and their own
ports. Every process they start carries KD_RAY_TEST_CLUSTER=<temp dir> in its environment; the
teardown stops exactly those processes (never `ray stop`, which would hit every Ray on the machine).
"""
import copy
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from conftest import RAY_TEST_ENV
from kd_ray.errors import ConfigError
from kd_ray.cluster.submit import entrypoint, use_token_if_available

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")


# --- cluster.yaml and Dockerfile --------------------------------------------------------------

def local_variant(text: str) -> dict:
    """cluster.yaml with its commented on-premises block swapped in, as its comment says."""
    main = yaml.safe_load(text)
    block = text.split("# BEGIN local\n")[1].split("# END local")[0]
    local = yaml.safe_load("\n".join(line[2:] for line in block.splitlines()))
    swapped = ("provider", "auth", "available_node_types", "head_node_type", "max_workers")
    return {**{k: v for k, v in main.items() if k not in swapped}, **local}


def test_cluster_yaml_and_its_local_variant_pass_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (REPO / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before validating
    validate_config(prepared)
    assert prepared["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith("g")
    assert "--gpus all" in config["docker"]["worker_run_options"]
    starts = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts  # job server on loopback, reached by SSH tunnel
    assert "KD_RAY_HEAD_DIR=/mnt/shared" in " ".join(config["docker"]["run_options"])
    assert any("pip install" in c and "kd_ray" in c for c in config["setup_commands"])

    local = prepare_config(local_variant(text))
    validate_config(local)
    assert local["provider"]["type"] == "local" and local["max_workers"] == 2

    broken = copy.deepcopy(config)
    broken["docker"]["imag"] = "typo"
    with pytest.raises(Exception, match="imag"):
        validate_config(prepare_config(broken))


def test_cluster_local_yaml_passes_ray_validation_and_never_stops_other_rays():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster-local.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local" and "docker" not in config
    assert config["file_mounts"]["~/kd_ray"] == "."  # where scripts/cluster_job.py works from
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert not any("ray stop" in c for c in starts) and "--dashboard-host=127.0.0.1" in starts[0]


def test_dockerfile_pins_agree_with_pyproject_and_install_this_repo():
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # Python 3.10: tomli, in the dev extra there
        import tomli as tomllib
    text = (REPO / "Dockerfile").read_text()
    args = dict(line.split(None, 1)[1].split("=", 1) for line in text.splitlines()
                if line.startswith("ARG ") and "=" in line)
    deps = {Requirement(d).name: Requirement(d) for d in
            tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    pins = {"torch": args["TORCH_VERSION"], "torchvision": args["TORCHVISION_VERSION"],
            "ray": args["RAY_VERSION"]}
    for name, version in pins.items():
        assert deps[name].specifier.contains(version), f"{name}=={version} not in {deps[name]}"
    assert {"default", "train", "tune"} <= deps["ray"].extras
    assert 'pip install --no-cache-dir "ray[train,tune,default]==${RAY_VERSION}"' in text
    assert "torch==${TORCH_VERSION} torchvision==${TORCHVISION_VERSION}" in text
    runs = [line.strip() for line in text.splitlines()]
    assert "COPY . /opt/kd_ray" in runs and "WORKDIR /opt/kd_ray" in runs
    assert any(line.startswith("RUN pip install") and line.endswith(" .") for line in runs)
    assert "--gpus all" in text and "--shm-size" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "results", ".git"} <= set(ignored)


# --- kd-ray submit: what the job runs -----------------------------------------------------------

def test_submit_points_relative_paths_at_the_head_dir_and_keeps_absolute_ones():
    line = entrypoint("distill", ["-c", str(REPO / "configs" / "small.yaml"),
                                  "--set", "distill.teacher_path=results/t/teacher.pt",
                                  "--set", "data.root=/data/x"])
    head = '"${KD_RAY_HEAD_DIR:-$HOME/kd_ray_jobs}"'
    assert line.startswith('"${KD_RAY_PYTHON:-python}" -m kd_ray.cli distill -c configs/small.yaml ')
    assert line.endswith(f"--set distill.teacher_path={head}/results/t/teacher.pt "
                         f"--set run.storage={head}/results")
    assert "data.root=/data/x" in line and "data.root=\"" not in line
    explicit = entrypoint("pipeline", ["--set", "run.storage=s3://bucket/kd"], head_dir="~/jobs",
                          python="/opt/py/bin/python")
    assert explicit == ("/opt/py/bin/python -m kd_ray.cli pipeline --set run.storage=s3://bucket/kd")
    demo = entrypoint("demo", [], head_dir="/srv/kd")
    assert demo.endswith("--set run.storage=/srv/kd/results")
    home = entrypoint("tune", ["--resume", "results/sweep"], head_dir="~/jobs")
    assert home.endswith('--resume "$HOME"/jobs/results/sweep')
    # What the head's shell makes of it:
    out = subprocess.run(["sh", "-c", f"printf '%s\\n' {demo.split(' ', 4)[4]}"],
                         capture_output=True, text=True, env={"HOME": "/home/u"})
    assert out.stdout.split() == ["--set", "run.storage=/srv/kd/results"]
    with pytest.raises(ConfigError, match="outside"):
        entrypoint("distill", ["-c", "/etc/hostname"])
    with pytest.raises(ConfigError, match="unknown key"):
        entrypoint("distill", ["--set", "run.nope=1"])  # checked before anything is uploaded
    with pytest.raises(ConfigError, match="absolute"):
        entrypoint("distill", [], head_dir="relative/dir")


def test_submit_uses_a_token_when_there_is_one(monkeypatch, tmp_path):
    monkeypatch.setattr("kd_ray.cluster.TOKEN_FILE", tmp_path / "none")
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert use_token_if_available() == "disabled"
    monkeypatch.delenv("RAY_AUTH_MODE")
    (tmp_path / "token").write_text("secret")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert use_token_if_available() == "token" and os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    with pytest.raises(ConfigError, match="no token"):
        use_token_if_available()


# --- real clusters --------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port_range(count: int = 60) -> tuple[int, int]:
    """A run of free ports below the ephemeral range, for one node's worker processes."""
    for _ in range(100):
        start = random.randrange(20000, 32000 - count)
        try:
            for port in range(start, start + count):
                with socket.socket() as s:
                    s.bind(("", port))
            return start, start + count - 1
        except OSError:
            continue
    raise RuntimeError("no free port range")


def node_port_args() -> list[str]:
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
    low, high = free_port_range()
    args = [str(x) for pair in zip(names, free_ports(len(names))) for x in pair]
    return args + ["--min-worker-port", str(low), "--max-worker-port", str(high)]


def marked_processes(marker: str, key: str = "KD_RAY_TEST_CLUSTER") -> list[int]:
    """PIDs whose environment carries this cluster's marker (zombies have none)."""
    needle = f"{key}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def stop_marked(marker: str, key: str = "KD_RAY_TEST_CLUSTER") -> list[int]:
    """SIGTERM, then SIGKILL, the processes of one test cluster; returns any left."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for pid in marked_processes(marker, key):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while marked_processes(marker, key) and time.time() < deadline:
            time.sleep(0.2)
    return marked_processes(marker, key)


@pytest.fixture
def cluster_env():
    """A short temp dir, and the environment every process of the test cluster inherits."""
    temp = tempfile.mkdtemp(prefix="kdr", dir="/tmp")
    os.mkdir(os.path.join(temp, "ray"))  # RAY_TMPDIR/ray: where Ray notes the latest address
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "KD_RAY_HEAD_DIR")}
    env.update(RAY_TEST_ENV, KD_RAY_TEST_CLUSTER=temp, RAY_TMPDIR=temp, PYTHONUNBUFFERED="1",
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    try:
        yield temp, env
    finally:
        left = stop_marked(temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the test cluster still running: {left}"


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def alive_nodes(url: str) -> list[dict]:
    nodes = get_json(f"{url}/api/v0/nodes")["data"]["result"]["result"]
    return [n for n in nodes if n["state"] == "ALIVE"]


def wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = check()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def ray_start(*args, env, timeout=90):
    """`ray start`, tried twice: Ray gives a new raylet a fixed 30 s to register, which a 2-core
    machine running the rest of the suite can miss. A failed try's processes are stopped first
    (only its own: each try carries its own marker)."""
    for attempt in (1, 2):
        marker = f"{os.getpid()}-{time.monotonic_ns()}"
        out = subprocess.run([str(RAY), "start", *args, "--disable-usage-stats"],
                             env=dict(env, KD_RAY_TEST_START=marker), capture_output=True, text=True,
                             timeout=timeout, start_new_session=True)
        if out.returncode == 0 or "timed out during startup" not in out.stderr or attempt == 2:
            break
        assert not stop_marked(marker, "KD_RAY_TEST_START"), "a failed `ray start` left processes"
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def export_random_teacher(path: Path) -> None:
    import torch

    from kd_ray.models import build_model, export_teacher

    torch.manual_seed(0)
    export_teacher(path, build_model("tiny_cnn", 10), "tiny_cnn", [f"class{i}" for i in range(10)], 32)


JOB_SETTINGS = ["data.name=synthetic", "data.synthetic_size=128", "model.student=tiny_cnn",
                "optim.epochs=2", "optim.batch_size=32", "run.num_workers=2"]


def test_submitted_job_runs_ddp_on_a_two_node_cluster_and_files_land_on_the_head(cluster_env,
                                                                                 tmp_path):
    """`ray start --head` + a second `ray start --address` node on this machine; `kd-ray submit`
    runs a 2-worker distillation through the job API; results sit in the head's folder."""
    temp, env = cluster_env
    head_dir = tmp_path / "head"  # what cluster.yaml sets as KD_RAY_HEAD_DIR on the head
    gcs, dashboard, client = free_ports(3)
    # RAY_ADDRESS: Ray's own helpers in the cluster (Train's placement-group cleaner) would otherwise
    # look for "the" local cluster and find the session's too.
    env = dict(env, KD_RAY_HEAD_DIR=str(head_dir), KD_RAY_PYTHON=sys.executable,
               RAY_ADDRESS=f"127.0.0.1:{gcs}")
    # One CPU per node and one per Train worker: the two DDP ranks must use both nodes.
    ray_start("--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1",
              "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
              f"--ray-client-server-port={client}", f"--temp-dir={temp}/ray",
              "--object-store-memory=100000000", *node_port_args(), env=env)
    url = f"http://127.0.0.1:{dashboard}"
    wait_for(lambda: get_json(f"{url}/api/version"), 60, "the job server")
    ray_start(f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
              '--resources={"second_node": 1}', "--object-store-memory=100000000",
              *node_port_args(), env=env)
    nodes = wait_for(lambda: len(alive := alive_nodes(url)) == 2 and alive, 60, "two nodes")

    export_random_teacher(head_dir / "teachers" / "teacher.pt")
    sets = [x for s in [*JOB_SETTINGS, "run.name=job-kd", "distill.teacher_path=teachers/teacher.pt"]
            for x in ("--set", s)]
    out = subprocess.run([sys.executable, "-m", "kd_ray.cli", "submit", "--address", url,
                          "distill", *sets], env=env, capture_output=True, text=True, timeout=240,
                         cwd=tmp_path)  # any folder: the checkout is found from the package
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "epoch 2/2" in out.stdout and "succeeded" in out.stdout  # logs were streamed

    run_dir = head_dir / "results" / "job-kd"
    assert f"results in {run_dir}" in out.stdout
    assert len(list(run_dir.glob("checkpoint_2*"))) == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["teacher"] == str(head_dir / "teachers" / "teacher.pt")
    assert [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # The TensorBoard writer ran on the node of the job's driver: the head.
    job_id = out.stdout.split("submitted job ")[1].split()[0]
    job = get_json(f"{url}/api/jobs/{job_id}")
    writer = json.loads((run_dir / "tensorboard" / "writer.json").read_text())
    head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
    assert job["driver_node_id"] == head_id == writer["node_id"]
    # Both nodes hosted a Train worker.
    actors = get_json(f"{url}/api/v0/actors?limit=1000&detail=1")["data"]["result"]["result"]
    worker_nodes = {a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"}
    assert len(worker_nodes) == 2 and head_id in worker_nodes
    # Nothing of the checkout's own results/ or .venv went up with the job.
    assert not (REPO / "results" / "job-kd").exists()


# What the three scripts below start with: a ray.cluster_utils.Cluster head (one CPU, loopback
# dashboard, every port free-picked: the session's instance runs beside it); add_node() adds the
# one-CPU second node. The script's last argument is the 9 ports.
CLUSTER_START = """
import json, os, sys
import ray
from ray.cluster_utils import Cluster

ports = json.loads(sys.argv[-1])
common = dict(num_cpus=1, object_store_memory=100 * 2**20, temp_dir=os.path.join(os.environ["RAY_TMPDIR"], "ray"))
cluster = Cluster(initialize_head=True, head_node_args=dict(
    common, gcs_server_port=ports[0], dashboard_host="127.0.0.1", dashboard_port=ports[1],
    dashboard_agent_listen_port=ports[2], metrics_agent_port=ports[3], metrics_export_port=ports[4],
    runtime_env_agent_port=ports[5]))


def add_node(**kwargs):
    return cluster.add_node(**common, **kwargs, metrics_agent_port=ports[6], metrics_export_port=ports[7],
                            runtime_env_agent_port=ports[8])
"""


def cluster_script(path: Path, settings: list, body: str) -> Path:
    path.write_text(f"SETTINGS = {settings!r}\n" + textwrap.dedent(CLUSTER_START) + textwrap.dedent(body))
    return path


CLUSTER_SCRIPT = """
from kd_ray.config import load_config
from kd_ray.cluster.stage import run_stage

out, teacher = sys.argv[1], sys.argv[2]
worker = add_node(resources={"second_node": 1})
cluster.wait_for_nodes()
ray.init(address=cluster.address)
cfg = load_config(overrides=SETTINGS + [f"distill.teacher_path={teacher}",
                                        f"run.storage={out}", "run.name=two-nodes"])
result = run_stage(cfg, "distill")
workers = [a for a in ray._private.state.actors().values()
           if a["ActorClassName"] == "RayTrainWorker"]
json.dump({"head": cluster.head_node.node_id, "worker": worker.node_id,
           "train_worker_nodes": sorted({a["Address"]["NodeID"] for a in workers}),
           "driver_pid": os.getpid(), "run_dir": str(result.run_dir)},
          open(os.path.join(out, "nodes.json"), "w"))
ray.shutdown()
cluster.shutdown()
os._exit(0)  # skip Ray's exit hooks (seconds of waiting); the test's teardown checks for leftovers
"""


def test_ddp_across_two_cluster_utils_nodes_writes_tensorboard_on_the_head(cluster_env, tmp_path):
    """ray.cluster_utils.Cluster (in a subprocess): one DDP rank per node; the TensorBoard files
    come from the Train controller on the head node, not from the other node."""
    temp, env = cluster_env
    teacher = tmp_path / "teacher.pt"
    export_random_teacher(teacher)
    script = cluster_script(tmp_path / "two_nodes.py", JOB_SETTINGS, CLUSTER_SCRIPT)
    ports = free_ports(9)
    env = dict(env, RAY_ADDRESS=f"127.0.0.1:{ports[0]}")  # as in the test above
    out = subprocess.run([sys.executable, str(script), str(tmp_path), str(teacher),
                          json.dumps(ports)], env=env, capture_output=True, text=True,
                         timeout=240, start_new_session=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    nodes = json.loads((tmp_path / "nodes.json").read_text())
    assert nodes["head"] != nodes["worker"]
    assert nodes["train_worker_nodes"] == sorted([nodes["head"], nodes["worker"]])
    run_dir = Path(nodes["run_dir"])
    assert len(list(run_dir.glob("checkpoint_2*"))) == 2
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    writer = json.loads((run_dir / "tensorboard" / "writer.json").read_text())
    assert writer["node_id"] == nodes["head"]
    assert writer["pid"] != nodes["driver_pid"]  # the controller actor, a process on the head


ELASTIC_SCRIPT = """
import threading, time
from kd_ray.config import load_config
from kd_ray.cluster.stage import run_stage
from kd_ray.testing.faults import read_events

out = sys.argv[1]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
metrics, faults, log = os.path.join(out, "elastic", "metrics.jsonl"), os.path.join(out, "faults"), {}

def epochs_logged():
    return len(open(metrics).read().splitlines()) if os.path.exists(metrics) else 0

def until(check):
    while not check():
        time.sleep(0.2)

def watch():  # T17: a node joins a run at its minimum; T16: it leaves again (main thread)
    until(lambda: epochs_logged() >= 1)
    node = add_node()
    log["added_after_epoch"] = epochs_logged()
    until(lambda: any(e["event"] == "epoch_start" and e["rank"] == 1 for e in read_events(faults)))
    grown = epochs_logged()
    until(lambda: epochs_logged() >= grown + 1)
    cluster.remove_node(node)
    log["removed_after_epoch"] = epochs_logged()

results = []  # the run in a thread: Ray adds a node only from the main thread (signal handlers)
cfg = load_config(overrides=SETTINGS + [f"run.storage={out}", "run.name=elastic"])
runner = threading.Thread(target=lambda: results.append(run_stage(cfg, "teacher")), daemon=True)
runner.start()
watch()
runner.join()
json.dump({**log, "summary": results[0].summary}, open(os.path.join(out, "elastic.json"), "w"), default=str)
ray.shutdown()
cluster.shutdown()
os._exit(0)
"""
ELASTIC_SETTINGS = ["data.name=synthetic", "data.synthetic_size=2048", "data.image_size=16",
                    "model.teacher=tiny_cnn", "optim.epochs=7", "optim.batch_size=64",
                    "run.num_workers=[1, 2]", "run.resize_interval_s=2", "run.max_failures=6"]


def test_t16_t17_an_elastic_run_grows_when_a_node_joins_and_goes_on_when_it_leaves(cluster_env, tmp_path):
    """ray.cluster_utils.Cluster (in a subprocess), run.num_workers [1, 2], one CPU per node: the
    run starts on the head alone; a node joins after epoch 1 (T17: the group grows to 2 ranks from
    the last checkpoint) and leaves after an epoch on 2 ranks (T16: the run goes on with 1 and
    finishes); each epoch is logged once."""
    temp, env = cluster_env
    script = cluster_script(tmp_path / "elastic.py", ELASTIC_SETTINGS, ELASTIC_SCRIPT)
    ports = free_ports(9)
    # After the loss Ray first asks for the old size again, until the group start times out.
    env = dict(env, RAY_ADDRESS=f"127.0.0.1:{ports[0]}", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="15",
               KD_RAY_FAULTS=json.dumps({"dir": str(tmp_path / "faults"), "faults": [
                   # Holds on rank 0 (once each) so that a join and a loss land inside the run.
                   {"kind": "sleep", "rank": 0, "epoch": 2, "step": 0, "seconds": 30, "once": True},
                   {"kind": "sleep", "rank": 0, "epoch": 4, "step": 0, "seconds": 10, "once": True}]}))
    out = subprocess.run([sys.executable, str(script), str(tmp_path), json.dumps(ports)], env=env,
                         capture_output=True, text=True, timeout=400, start_new_session=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    done = json.loads((tmp_path / "elastic.json").read_text())
    from kd_ray.testing.faults import read_events

    groups = []  # [start epoch, ranks] of each worker group, in order (consecutive attempt lines)
    for e in read_events(tmp_path / "faults"):
        if e["event"] == "attempt":
            if groups and groups[-1][0] == e["start_epoch"] and e["rank"] not in groups[-1][1]:
                groups[-1][1].add(e["rank"])
            else:
                groups.append([e["start_epoch"], {e["rank"]}])
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "elastic" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 8)), epochs  # each epoch once, none missing
    sizes = [len(ranks) for _, ranks in groups]
    assert groups[0] == [1, {0}], groups  # started at its minimum: one node, one CPU
    assert 2 in sizes and groups[sizes.index(2)][0] >= done["added_after_epoch"], (groups, done)  # T17
    assert sizes[-1] == 1 and sizes.index(2) < len(sizes) - 1, (groups, done)  # T16: on with 1 to the end
    assert done["summary"]["epochs"] == 7


SWEEP_SCRIPT = """
import glob, threading, time
from kd_ray.config import load_config
from kd_ray.cluster.tune import run_sweep

out, teacher = sys.argv[1], sys.argv[2]
node = add_node()
cluster.wait_for_nodes()
ray.init(address=cluster.address)

def logged(path):
    return len(open(path).read().splitlines())

def watch():  # T18: once both trials (one per node) have logged epoch 1, the second node goes
    while True:
        files = glob.glob(os.path.join(out, "sweep", "trials", "*", "metrics.jsonl"))
        if len(files) == 2 and all(logged(f) >= 1 for f in files):
            break
        time.sleep(0.2)
    cluster.remove_node(node)

threading.Thread(target=watch, daemon=True).start()
cfg = load_config(overrides=SETTINGS + [f"distill.teacher_path={teacher}", f"run.storage={out}", "run.name=sweep"])
run_sweep(cfg)
ray.shutdown()
cluster.shutdown()
os._exit(0)
"""
SWEEP_SETTINGS = ["data.name=synthetic", "data.synthetic_size=512", "data.image_size=32",
                  "model.student=tiny_cnn", "optim.epochs=3", "optim.batch_size=32", "run.num_workers=1",
                  "run.max_failures=2", "sweep.scheduler=none", "sweep.space={distill.temperature: [1, 2]}"]


def test_t18_a_sweep_trial_whose_node_is_lost_resumes_on_the_other_node(cluster_env, tmp_path):
    """Two 1-worker trials on two one-CPU nodes; the second node is removed while both hold in
    epoch 2: Tune retries the lost trial on the head once the other one is done, and it continues
    from its epoch-1 checkpoint; both finish with each epoch logged once."""
    temp, env = cluster_env
    teacher = tmp_path / "teacher.pt"
    export_random_teacher(teacher)
    script = cluster_script(tmp_path / "sweep.py", SWEEP_SETTINGS, SWEEP_SCRIPT)
    ports = free_ports(9)
    env = dict(env, RAY_ADDRESS=f"127.0.0.1:{ports[0]}", KD_RAY_FAULTS=json.dumps({
        "dir": str(tmp_path / "faults"), "faults": [{"kind": "sleep", "epoch": 2, "step": 0, "seconds": 8}]}))
    out = subprocess.run([sys.executable, str(script), str(tmp_path), str(teacher), json.dumps(ports)],
                         env=env, capture_output=True, text=True, timeout=400, start_new_session=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    from kd_ray.testing.faults import read_events

    starts = sorted(e["start_epoch"] for e in read_events(tmp_path / "faults") if e["event"] == "attempt")
    assert starts == [1, 1, 2], starts  # two trials from scratch, the lost one again from epoch 2
    trials = sorted((tmp_path / "sweep" / "trials").glob("*/metrics.jsonl"))
    assert len(trials) == 2
    for metrics in trials:
        assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == [1, 2, 3], metrics
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert summary.count("completed") == 2, summary
