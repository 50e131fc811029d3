"""Join the Ray cluster in RAY_ADDRESS, or start a local instance sized for the run."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading

import ray
import ray.util

from kd_ray.config import Config
from kd_ray.config.checks import check_machine
from kd_ray.errors import ConfigError, RayStartError, first_line
from kd_ray.storage import STORAGE_ENV, is_uri


def ensure_ray(cfg: Config, extra_cpus: float = 0.0) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one sized for this run.

    ``extra_cpus``: CPUs beyond the workers' (a Tune trial's own driver).
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        env = {**((_name_cluster(address) or {}).get("env_vars") or {}), **_storage_env(cfg), **_faults_env()}
        _start(f"could not join the Ray cluster at RAY_ADDRESS={address}",
               "check that the cluster is up and the address is right, or unset RAY_ADDRESS",
               lambda: ray.init(log_to_driver=True, runtime_env={"env_vars": env} if env else None))
        return
    check_machine(cfg)  # the CLI ran it already; library callers get it here
    # A laptop-sized local instance has no preemption to watch for.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    needed = math.ceil(cfg.run.min_workers * cfg.run.cpus_per_worker)
    # One logical CPU more for a sweep's tiny trial drivers, so they never take a worker's place.
    # The dashboard (and its job server) stays on loopback unless run.dashboard_host says otherwise.
    _start("the local Ray instance did not start",
           "the machine may be overloaded: retry when it is less busy (nothing was trained)",
           lambda: start_local_ray(num_cpus=max(os.cpu_count() or 1, needed) + math.ceil(extra_cpus),
                                   dashboard_host=cfg.run.dashboard_host, include_dashboard=True))


def _start(what: str, fix: str, init) -> None:
    """Run ``init``; Ray's start-up failures (a timeout under load) become one line, exit 1.

    ray.init replaces the SIGTERM handler with an exit (which aborted the driver mid-run): a
    Python handler set before (the CLI's: SIGTERM stops as Ctrl-C does) is put back."""
    term = signal.getsignal(signal.SIGTERM)
    try:
        init()
    except Exception as exc:  # Ray raises bare Exception, TimeoutError, ConnectionError ...
        ray.shutdown()  # stop what this process started, if anything
        first = first_line(str(exc))[:200]  # the text: its type name is already in the message
        raise RayStartError(f"{what} ({type(exc).__name__}: {first}): {fix}") from exc
    finally:
        if callable(term) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, term)


def _storage_env(cfg: Config) -> dict:
    """The driver's storage credentials and endpoint (AWS_*, ...), for workers on other nodes.

    Only for a ``run.storage`` URI, and only the variables the job's own runtime_env leaves out
    (a local instance's workers inherit this process's environment anyway).
    """
    if not is_uri(cfg.run.storage):
        return {}
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    named = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k) and k not in named}


def _faults_env() -> dict:
    """The chaos suite's fault plan (tests only; never set in user runs) for the job's actors: a
    1-worker sweep trial builds its loop config in its Tune actor, where Train's driver would."""
    plan = os.environ.get("KD_RAY_FAULTS")  # cluster.worker.FAULTS_ENV (not imported: torch)
    return {"KD_RAY_FAULTS": plan} if plan else {}


def _name_cluster(address: str) -> dict | None:
    """A runtime_env that passes this GCS address on to every process of the run.

    A Ray job's driver is given its cluster's address, but the actors it starts (Train's
    placement-group cleaner among them) get the environment of `ray start`: on a launcher cluster
    that has no RAY_ADDRESS, and with another Ray instance on the head they fail with "Found
    multiple active Ray instances". The job's own runtime_env is merged with this one.
    """
    if "://" in address or address == "auto":
        return None
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    if "RAY_ADDRESS" in ((job.get("runtime_env") or {}).get("env_vars") or {}):
        return None  # the job names it already (the same key twice is an error for Ray)
    return {"env_vars": {"RAY_ADDRESS": address}}


def start_local_ray(**init_kwargs):
    """``ray.init`` of a new local instance whose processes all know its address (see below)."""
    _pin_local_address()
    return ray.init(address="local", **init_kwargs)


def _pin_local_address() -> None:
    """Give the local instance a known GCS port and put it in RAY_ADDRESS before it starts.

    Ray's helper processes (Train's placement-group cleaner among them) find their cluster through
    RAY_ADDRESS, else by scanning for running instances: with a second Ray instance on the machine
    they cannot choose, and a sweep's finished trials would keep their CPUs forever. Processes
    the local instance starts inherit this environment.
    """
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"


def check_resources(cfg: Config) -> None:
    """A run too big for the cluster is refused at once (Ray would wait for it forever)."""
    resources = ray.cluster_resources()
    kind = "GPU" if cfg.run.use_gpu else "CPU"
    per_worker = 1.0 if cfg.run.use_gpu else cfg.run.cpus_per_worker
    needed, have = cfg.run.min_workers * per_worker, resources.get(kind, 0.0)
    if needed > have:
        raise ConfigError(f"run.num_workers={cfg.run.num_workers} needs {needed:g} {kind} but the "
                          f"cluster has {have:g}: lower run.num_workers or add nodes")
