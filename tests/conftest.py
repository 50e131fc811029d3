"""Shared fixtures. Ray starts at most once per test run (the xdist processes share it), only for
tests that ask for it.

Tests that use a Ray fixture are marked ``ray`` (``cluster`` for the multi-node ones) here, so
``make test-fast`` (``-m "not ray and not chaos and not cluster"``) never starts Ray.
"""
import contextlib
import fcntl
import json
import os
import signal
import sys
import time

import pytest

# Fast failure detection and no token auth for the local test cluster (see DESIGN.md).
RAY_TEST_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
    "RAY_DEDUP_LOGS": "0",
}

# Before anything imports Ray (it reads RAY_AUTH_MODE on import): every process of the session
# uses the local test cluster's settings, whatever ~/.ray holds.
os.environ.update(RAY_TEST_ENV)

from kd_ray import log  # noqa: E402

log.configure()  # the CLI's console format, so tests read the same lines a user sees

MARK_BY_FIXTURE = {"ray_cluster": "ray", "cli_env": "ray", "cluster_env": "cluster"}
RAY_MARKS = ("ray", "chaos", "cluster")
_session_ray = []  # the address, once the ray_cluster fixture has started the session's instance


# The longest files first (make test runs files on 2 xdist processes, each file on one of them,
# in this order): the short files fill in at the end, so neither process waits long for the other.
LONGEST_FIRST = ["test_chaos.py", "test_cluster.py", "test_tune_ray.py", "test_auto_ray.py",
                 "test_teachers_ray.py", "test_ray_train.py", "test_install.py", "test_storage_ray.py",
                 "test_launcher.py", "test_features_ray.py", "test_cache_ray.py", "test_tracking.py",
                 "test_parquet_ray.py", "test_midepoch.py", "test_layers.py", "test_deploy.py",
                 "test_recovery.py"]


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, mark in MARK_BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(mark)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


def pytest_runtest_teardown(item, nextitem):
    """A test without a Ray mark must not start Ray in this process: `make test-fast` promises no
    Ray, and under xdist such an instance would stand in the way of the session fixture's."""
    ray = sys.modules.get("ray")
    if _session_ray or ray is None or not ray.is_initialized():
        return
    if not any(item.get_closest_marker(mark) for mark in RAY_MARKS):
        ray.shutdown()
        pytest.fail(f"{item.nodeid} started Ray in the test process without a Ray fixture", pytrace=False)


@pytest.fixture(autouse=True)
def signal_handlers_kept():
    """Each test starts with the handlers the last one found: Ray Tune keeps its SIGINT handler
    after a sweep, and under xdist the next test in the same process would inherit it."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def shared_instance(root):
    """The shared instance's record ({address, owner, users}: pids) under a lock, or a
    record of its own where the run has one process (``root`` None); set it to None to drop it."""
    if root is None:
        yield [None]
        return
    path = root / "ray_instance.json"
    with open(root / "ray_instance.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        box = [json.loads(path.read_text()) if path.exists() else None]
        yield box
        if box[0] is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(json.dumps(box[0]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray instance for the whole test run, shared by the xdist processes: the first
    that needs it starts it, the others join it, and the one that started it stops it once the
    last has left (an instance costs ~10 CPU s to start and ~0.1 core while it idles on these 2
    cores). Yields the address other drivers can join."""
    os.environ.update(RAY_TEST_ENV)
    import ray

    from kd_ray.cluster.session import start_local_ray

    root = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else None
    me = os.getpid()
    with shared_instance(root) as box:
        if box[0] and _alive(box[0]["owner"]):
            address = box[0]["address"]
            ray.init(address=address)
            os.environ["RAY_ADDRESS"] = address  # as start_local_ray sets it in the owner
            box[0]["users"].append(me)
        else:
            # 10 CPUs: each of the two xdist processes can run two 2-worker sweep trials and their
            # drivers at once. start_local_ray puts the address in RAY_ADDRESS for Ray's own
            # helpers, also when other Ray instances run here.
            context = start_local_ray(num_cpus=10, object_store_memory=512 * 2**20,
                                      dashboard_host="127.0.0.1", include_dashboard=True)
            address = context.address_info["gcs_address"]
            box[0] = {"address": address, "owner": me, "users": [me]}
    owner = box[0]["owner"] == me
    _session_ray.append(address)
    yield address
    with shared_instance(root) as box:
        if box[0]:
            box[0]["users"].remove(me)
    while owner:  # the other process may still be running Ray tests on it
        with shared_instance(root) as box:
            if not box[0] or not [pid for pid in box[0]["users"] if _alive(pid)]:
                box[0] = None
                break
        time.sleep(1)
    ray.shutdown()  # stops the instance where this process started it, else leaves it
    _session_ray.clear()


@pytest.fixture
def cli_env(ray_cluster):
    """Environment for `kd-ray` subprocesses that join the session's Ray instance."""
    env = dict(os.environ, **RAY_TEST_ENV, RAY_ADDRESS=ray_cluster, PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1 for the session; yields the environment
    (dummy keys, AWS_ENDPOINT_URL) that pyarrow, kd-ray subprocesses and Ray workers read."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the session's S3 server; yields its ``s3://`` URI."""
    import re

    from pyarrow.fs import S3FileSystem

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid()}"
    endpoint = s3_server["AWS_ENDPOINT_URL"]
    S3FileSystem(allow_bucket_creation=True, endpoint_override=endpoint.removeprefix("http://"),
                 scheme="http").create_dir(name)
    return f"s3://{name}"


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything starts or joins a Ray instance (bad input must stop before)."""
    import kd_ray.cluster.cache
    import kd_ray.cluster.stage
    import kd_ray.cluster.tune

    def fail(*args, **kwargs):
        raise AssertionError("Ray was started for bad input")

    for module in (kd_ray.cluster.stage, kd_ray.cluster.tune, kd_ray.cluster.cache):
        monkeypatch.setattr(module, "ensure_ray", fail)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A 3-class PNG image folder (6 train, 2 val images per class, 32 px); a test module that
    needs another tree defines its own ``tree``."""
    from kd_ray.data import write_synthetic_imagefolder

    root = tmp_path_factory.mktemp("tree")
    write_synthetic_imagefolder(root, num_classes=3, per_class=(6, 2), image_size=32)
    return root
