"""``kd-ray submit``: run any kd-ray command as a Ray job, stream its logs, return its exit code.

The job's working directory is this checkout (without .venv, results and caches), so the cluster
runs the code you have here; an installed kd_ray (no checkout) uploads the current folder as the
working directory and the installed package beside it (``py_modules``). Relative paths in the config would resolve inside Ray's temporary
copy of that directory on the head and vanish with it; submit points them at a folder on the head
instead: ``--head-dir``, else ``$KD_RAY_HEAD_DIR`` as set on the head, else ``~/kd_ray_jobs``.
The head's shell expands that when the job starts, so the client never needs the head's paths.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
import uuid
from pathlib import Path

from kd_ray import cluster
from kd_ray.config import PATH_KEYS, demo_config, load_config
from kd_ray.errors import ConfigError, KdRayError, first_line
from kd_ray.log import get

log = get(__name__)

PACKAGE = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # cli.py shows it in --help too
# Evaluated by the head's shell: the head (cluster.yaml) decides where results go.
HEAD_DIR = '"${KD_RAY_HEAD_DIR:-$HOME/kd_ray_jobs}"'
HEAD_PYTHON = '"${KD_RAY_PYTHON:-python}"'
# Never uploaded with the working directory (Ray's .gitignore handling aside).
EXCLUDES = ["/.venv", "/venv", ".git", "/results", "**/__pycache__", ".pytest_cache", "*.egg-info",
            "/build", "/dist", "/.whl", "/.gl"]
CONFIG_COMMANDS = ("train-teacher", "train-student", "distill", "pipeline", "tune", "demo")


def head_path(path: str, head_dir: str | None) -> str:
    """Shell text for ``path`` on the head: relative paths go under the head dir, ~ is $HOME."""
    if path == "~" or path.startswith("~/"):
        return '"$HOME"' + shlex.quote(path[1:]) if path != "~" else '"$HOME"'
    if Path(path).is_absolute():
        return shlex.quote(path)
    base = HEAD_DIR if head_dir is None else head_path(head_dir, None)
    return base + shlex.quote("/" + path)


def _inside_repo(path: str, what: str, workdir: Path) -> str:
    """``path`` relative to the uploaded directory, where the job will look for it."""
    full = Path(path).expanduser().resolve()
    if not full.is_file():
        where = "" if Path(path).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"{what} {path} not found{where}")
    if not full.is_relative_to(workdir):
        raise ConfigError(f"{what} {path} is outside {workdir}, the folder uploaded with the job: "
                          "move it there (e.g. under configs/)")
    return full.relative_to(workdir).as_posix()


def source_root() -> Path | None:
    """The checkout this kd_ray runs from, or None when it is installed (site-packages)."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / ".git").exists() else None


def upload(workdir: Path) -> dict:
    """The job's runtime_env: ``workdir`` as its working directory, plus the installed package
    when kd_ray is not part of it."""
    env = {"working_dir": str(workdir), "excludes": EXCLUDES}
    if not (workdir / "kd_ray").is_dir():
        env["py_modules"] = [str(PACKAGE)]
    return env


def entrypoint(command: str, args: list[str], workdir: Path | None = None, head_dir: str | None = None,
               python: str | None = None) -> str:
    """The shell command the job runs on the head, with config paths made absolute there."""
    workdir = workdir or source_root() or Path.cwd()
    if head_dir is not None and not (Path(head_dir).is_absolute() or head_dir.startswith("~")):
        raise ConfigError(f"--head-dir must be absolute or start with ~, got {head_dir!r}")
    words = [HEAD_PYTHON if python is None else shlex.quote(python), "-m", "kd_ray.cli",
             shlex.quote(command)]
    if command not in CONFIG_COMMANDS:
        return " ".join(words + [shlex.quote(a) for a in args])
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-c", "--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--args-file")
    parser.add_argument("--resume")  # tune: a sweep folder, which lives on the head
    known, rest = parser.parse_known_args(args)
    if known.resume:
        return " ".join(words + ["--resume", head_path(known.resume, head_dir)]
                        + [shlex.quote(a) for a in rest])
    if known.config:
        known.config = _inside_repo(known.config, "config file", workdir)
        words += ["-c", shlex.quote(known.config)]
    if known.args_file:
        known.args_file = _inside_repo(known.args_file, "args file", workdir)
        words += ["--args-file", shlex.quote(known.args_file)]
    for item in known.overrides:
        words += ["--set", shlex.quote(item)]
    words += [shlex.quote(a) for a in rest]
    # Checked here too: a bad config fails before anything is uploaded.
    default = demo_config() if command == "demo" else None
    config = workdir / known.config if known.config else default
    cfg = load_config(config, known.overrides,
                      workdir / known.args_file if known.args_file else None)
    for section, key in PATH_KEYS:
        value = getattr(getattr(cfg, section, None), key, None)
        if isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute():
            words += ["--set", shlex.quote(f"{section}.{key}=") + head_path(value, head_dir)]
        elif isinstance(value, list) and value:  # an ensemble's teacher files: one YAML list
            items = shlex.quote(", ").join(p if "://" in p else head_path(p, head_dir) for p in value)
            words += ["--set", shlex.quote(f"{section}.{key}=[") + items + shlex.quote("]")]
    return " ".join(words)


def use_token_if_available() -> str:
    """Ray 2.60's token auth. With RAY_AUTH_MODE unset, use a token when there is one (as `ray
    start` does), else none; Ray's job client then sends it as a bearer header. Call it before
    Ray is imported: Ray reads the mode once, on import."""
    mode = os.environ.setdefault("RAY_AUTH_MODE", "token" if cluster.has_token() else "disabled")
    if mode == "token" and not cluster.has_token():
        raise ConfigError("RAY_AUTH_MODE=token but no token here: copy the head's ~/.ray/auth_token "
                          "to this machine, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
    return mode


def connect(address: str | None):
    # Imported only now: Ray reads RAY_AUTH_MODE once, on import (use_token_if_available sets it).
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if address:  # an explicit flag beats the environment (Ray's client reads these first)
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        os.environ.pop("RAY_ADDRESS", None)
    elif not (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")):
        address = DEFAULT_ADDRESS
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as exc:
        raise KdRayError(f"the job server at {address} refused us ({first_line(exc.message)}): "
                         "it uses token auth, so copy the head's ~/.ray/auth_token here, or set "
                         "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH") from None
    except ConnectionError as exc:
        raise KdRayError(f"no Ray job server at {address or 'the address in the environment'} "
                         f"({first_line(exc)}): start the cluster (`ray start --head` or "
                         "`ray up cluster.yaml`) and forward its dashboard port "
                         "(`ray dashboard cluster.yaml`)") from None


async def _follow(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)  # the job's own output, as it is
        sys.stdout.flush()


def submit_command(args) -> int:
    command = args.job_command
    if command == "submit":
        raise ConfigError("`kd-ray submit submit` makes no sense: name the command to run")
    workdir = source_root() or Path.cwd()
    line = entrypoint(command, list(args.job_args), workdir, args.head_dir, args.python)
    mode = use_token_if_available()
    client = connect(args.address)
    job_id = f"kd_ray-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    client.submit_job(entrypoint=line, submission_id=job_id, metadata={"kd_ray_command": command},
                      runtime_env=upload(workdir))
    where = client.get_address()
    log.info(f"submitted job {job_id} to {where} (auth: {mode})")
    log.info(f"entrypoint: {line}")
    if args.no_wait:
        log.info(f"follow it with: ray job logs -f {job_id} --address {where}")
        return 0
    try:
        try:
            asyncio.run(_follow(client, job_id))
        except RuntimeError as exc:  # the log stream dropped; the job goes on, so poll for it
            log.info(f"log stream ended early ({exc}); waiting for the job")
        return wait_for_exit(client, job_id)
    except KeyboardInterrupt:
        log.error(f"stopped following; job {job_id} keeps running. Stop it with: "
                  f"ray job stop {job_id} --address {where}")
        return 130


def wait_for_exit(client, job_id: str) -> int:
    """The job's exit code: 0 when it succeeded, else its driver's (1 if Ray has none)."""
    while not (info := client.get_job_info(job_id)).status.is_terminal():
        time.sleep(0.5)
    if info.status.value == "SUCCEEDED":
        log.info(f"job {job_id} succeeded")
        return 0
    code = info.driver_exit_code if info.driver_exit_code not in (None, 0) else 1
    message = first_line(info.message or "")
    log.error(f"error: job {job_id} {info.status.value.lower()} (exit code {code})"
              f"{': ' + message if message else ''}")
    logs = client.get_job_logs(job_id)
    if code == 127 or "No module named 'kd_ray'" in logs or "No module named 'ray'" in logs:
        log.error("hint: the head's `python` lacks Ray or kd_ray: start Ray from the activated "
                  "environment, set KD_RAY_PYTHON on the head, or pass --python")
    return code
