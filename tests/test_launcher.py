"""`ray up` on cluster-local.yaml and `scripts/cluster_submit.sh`, for real, over SSH to 127.0.0.1.

An sshd of the test's own (throwaway keys and config, its own port, 127.0.0.1 only) logs in as
the current user with HOME set to a temp folder (sshd's SetEnv): the synced checkout, the venv,
~/.bashrc and the launcher's files land there, never in the real home. Ray's launcher has no SSH
port setting, so an `ssh` first on the PATH adds `-p PORT`. The processes the SSH sessions start
(the head's Ray instance included) and the local ssh clients carry KD_RAY_TEST_CLUSTER=<temp dir>;
the teardown stops exactly those, then the sshd (a child of the test) and its sessions, and
removes the launcher's state (no `ray stop`, no `ray down`, whose `ray stop` would hit every Ray
instance on the machine).

Fast setup: cluster-local.yaml installs torch, Ray and the rest from the package index (minutes).
Here its venv takes them from this interpreter's site-packages and the synced checkout (a .pth
file) and gets the `ray` and `kd-ray` commands; its PATH line in ~/.bashrc runs as written. The
head's start command gets free ports and a temp dir of its own. About 2 minutes here.
"""
import getpass
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import RAY_TEST_ENV
from test_cluster import free_ports, node_port_args, stop_marked

REPO = Path(__file__).resolve().parent.parent
SSHD, SSH = shutil.which("sshd", path="/usr/sbin:/usr/bin:/sbin"), shutil.which("ssh")
MULTIPLE = "Found multiple active Ray instances"

pytestmark = pytest.mark.cluster


def start_sshd(temp: Path, port: int, env: dict) -> subprocess.Popen:
    # Not a skip: CI must run this test. scripts/test_deps.sh (run by `make test`) installs both.
    assert SSHD and SSH and shutil.which("rsync"), \
        "needs openssh-server and rsync: run scripts/test_deps.sh (as `make test` does)"
    return _start_sshd(temp, port, env)


def _start_sshd(temp: Path, port: int, env: dict) -> subprocess.Popen:
    for name in ("key", "host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", temp / name], check=True)
    shutil.copy(temp / "key.pub", temp / "authorized_keys")
    # What every SSH session (and so the head's Ray) sees: a throwaway home, the test's marker.
    session_env = {**RAY_TEST_ENV, "HOME": temp / "home", "KD_RAY_TEST_CLUSTER": temp,
                   "RAY_USAGE_STATS_ENABLED": 0}
    session_env.pop("RAY_AUTH_MODE")  # the cluster file's start command sets token mode
    (temp / "sshd_config").write_text(f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {temp}/host_key
AuthorizedKeysFile {temp}/authorized_keys
AuthenticationMethods publickey
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
SetEnv {' '.join(f'{k}={v}' for k, v in session_env.items())}
""")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation folder
    # -D: in the foreground, a child of this test, stopped and reaped by it.
    sshd = subprocess.Popen([SSHD, "-D", "-f", temp / "sshd_config", "-E", temp / "sshd.log"], env=env)
    # Ray's launcher calls `ssh` (and rsync's `ssh`) by name: this one knows the port.
    wrapper = temp / "bin" / "ssh"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {SSH} -p {port} "$@"\n')
    wrapper.chmod(0o755)
    for _ in range(100):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return sshd
        assert sshd.poll() is None, (temp / "sshd.log").read_text()
        time.sleep(0.1)
    raise AssertionError("sshd did not start listening")


def descendants(pid: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            pass
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        kids = [p for p, parent in parents.items() if parent == current]
        found += kids
        todo += kids
    return found


def stop(sshd: subprocess.Popen | None, temp: Path, cluster_name: str) -> list[int]:
    """The test's processes (Ray head, ssh clients and sessions), its sshd, its ssh control folder."""
    left = stop_marked(str(temp))
    if sshd is not None:
        for pid in descendants(sshd.pid):  # its sessions (as root they carry no marker)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        sshd.terminate()
        try:
            sshd.wait(10)
        except subprocess.TimeoutExpired:
            sshd.kill()
            sshd.wait()
    # Where Ray's launcher keeps this cluster's ssh control sockets (command_runner.py).
    control = Path("/tmp") / f"ray_ssh_{hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]}"
    shutil.rmtree(control / hashlib.sha256(cluster_name.encode()).hexdigest()[:10], ignore_errors=True)
    try:
        control.rmdir()
    except OSError:
        pass  # other clusters' sockets are there
    shutil.rmtree(temp, ignore_errors=True)
    return left


# In place of `pip install -e ~/kd_ray` and its dependencies: the synced checkout, then this
# interpreter's packages, on the venv's path; the `ray` and `kd-ray` commands pip would write.
FAST_SETUP = """\
import pathlib, site, sys
home, bin = pathlib.Path.home(), pathlib.Path(sys.executable).parent
pathlib.Path(site.getsitepackages()[0], "kd_ray_test.pth").write_text(f"{{home}}/kd_ray\\n{site}\\n")
for name, module in (("ray", "ray.scripts.scripts"), ("kd-ray", "kd_ray.cli")):
    (bin / name).write_text(f"#!{{sys.executable}}\\nimport sys\\nfrom {{module}} import main\\nsys.exit(main())\\n")
    (bin / name).chmod(0o755)
"""


def cluster_name(temp: Path) -> str:
    return f"kd-ray-test-{temp.name}"


def cluster_file(temp: Path, gcs: int, dashboard: int) -> Path:
    """cluster-local.yaml for 127.0.0.1, with the fast setup and the test's own ports."""
    config = yaml.safe_load((REPO / "cluster-local.yaml").read_text())
    setup, starts = config["setup_commands"], config["head_start_ray_commands"]
    assert len(setup) == 3 and "pip install" in setup[1] and "~/kd_ray" in setup[1]
    assert "kd_ray_env/bin" in setup[2] and "~/.bashrc" in setup[2]
    assert not any("ray stop" in c for c in starts + config["worker_start_ray_commands"])
    env_python = "~/kd_ray_env/bin/python"
    setup[0] = f"test -x {env_python} || {sys._base_executable} -m venv ~/kd_ray_env"
    (temp / "fast_setup.py").write_text(FAST_SETUP.format(site=sysconfig.get_paths()["purelib"]))
    setup[1] = f"{env_python} {temp}/fast_setup.py"
    ports = " ".join([f"--port={gcs}", "--node-ip-address=127.0.0.1", f"--dashboard-port={dashboard}",
                      f"--ray-client-server-port={free_ports(1)[0]}", f"--temp-dir={temp}/ray",
                      "--num-cpus=2", "--object-store-memory=100000000", "--disable-usage-stats",
                      *node_port_args()])
    assert len(starts) == 1 and "--port=6379" in starts[0]
    config["head_start_ray_commands"] = [starts[0].replace("--port=6379", ports)]
    config.update(cluster_name=cluster_name(temp), max_workers=0,
                  provider={"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
                  auth={"ssh_user": getpass.getuser(), "ssh_private_key": str(temp / "key")})
    config["file_mounts"]["~/.ray/auth_token"] = str(temp / "auth_token")
    path = temp / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(args: list, log: Path, env: dict, timeout: float) -> tuple[int, str]:
    """Output to a file: ssh's background masters would hold a pipe open."""
    with open(log, "w") as out:
        code = subprocess.run(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=timeout).returncode
    text = log.read_text()
    print(text)
    return code, text


def test_ray_up_and_cluster_submit_with_a_relative_config_on_a_loopback_cluster(ray_cluster):
    """`ray up -y` over SSH, then docs/clusters.md's `scripts/cluster_submit.sh ... -c configs/...`.
    `ray_cluster` (the session's Ray instance) is a second Ray instance on the machine."""
    temp = Path(tempfile.mkdtemp(prefix="kdl", dir="/tmp"))  # short: Unix socket paths
    (temp / "home").mkdir()
    (temp / "ray").mkdir()
    (temp / "auth_token").write_text(secrets.token_hex(32))
    ssh_port, gcs, dashboard = free_ports(3)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "KD_RAY_HEAD_DIR")}
    env.update(KD_RAY_TEST_CLUSTER=str(temp), RAY_TMPDIR=str(temp), TMPDIR=str(temp),
               PATH=f"{temp}/bin:{Path(sys.executable).parent}:{env['PATH']}")
    started, sshd = time.time(), None
    try:
        sshd = start_sshd(temp, ssh_port, env)
        config = cluster_file(temp, gcs, dashboard)
        code, up = run(["ray", "up", "-y", "--no-config-cache", config], temp / "up.log", env, 240)
        assert code == 0, up[-4000:]
        assert "Ray runtime started" in up
        # One TorchTrainer worker: Train's helpers (the MULTIPLE check below) without a second
        # worker's ~6 CPU s (2-worker DDP in a submitted job: test_cluster.py).
        sets = ["optim.teacher_epochs=2", "data.synthetic_size=256", "run.name=launcher",
                "run.num_workers=1", "run.runner=train"]
        # --address: this head's job server is on a free port, not 8265 (another Ray may hold it).
        code, out = run(["scripts/cluster_submit.sh", "--address", f"http://127.0.0.1:{dashboard}",
                         "train-teacher", "-c", "configs/small.yaml",
                         *[x for s in sets for x in ("--set", s)]],
                        temp / "submit.log", dict(env, CLUSTER=str(config)), 240)
        assert code == 0, out[-5000:]
        assert "epoch 2/2" in out and "succeeded" in out and "(auth: token)" in out
        assert "-m kd_ray.cli train-teacher -c configs/small.yaml" in out
        assert MULTIPLE not in out  # the job names its cluster to Train's helpers (session.py)

        run_dir = temp / "home" / "kd_ray_jobs" / "results" / "launcher"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["epochs"] == 2
        assert (run_dir / "teacher.pt").stat().st_size > 0
        assert len(list(run_dir.glob("checkpoint_2*"))) == 2
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert (temp / "home" / "kd_ray" / "configs" / "small.yaml").is_file()  # the synced checkout
        assert not (temp / "home" / "kd_ray" / ".git").exists()
        print(f"launcher test: up and job in {time.time() - started:.0f} s")
    finally:
        left = stop(sshd, temp, cluster_name(temp))
    assert not left, f"processes of the test cluster still running: {left}"
