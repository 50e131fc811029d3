"""Orchestration on Ray, the only layer that imports Ray: a stage as a TorchTrainer (one Ray task
for a 1-worker stage), the per-worker loop, the controller-side callbacks, the teacher cache as Ray tasks, Tune sweeps, the pipeline and
job submission."""
import os
from pathlib import Path

TOKEN_FILE = Path("~/.ray/auth_token").expanduser()


def has_token() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or (Path(path) if path else TOKEN_FILE).is_file()


# Ray reads RAY_AUTH_MODE once, when it is imported, and every module here imports Ray: the
# default is set first. With a token (as `ray start` or `ray get-auth-token` leave it) Ray uses
# it, as `ray start` does; without one, a local run needs none.
os.environ.setdefault("RAY_AUTH_MODE", "token" if has_token() else "disabled")
