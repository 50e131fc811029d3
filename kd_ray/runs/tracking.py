"""``run.tracker: mlflow``: every stage run (and the pipeline's comparison) logged to an MLflow
tracking URI beside TensorBoard. No Ray here; mlflow is imported only when the tracker is on.

One MLflow run per run folder: its id is kept in ``<run>/mlflow_run_id``, so a resumed run (a
rerun, a restarted controller) keeps logging into the same MLflow run. The writer is the
controller callback on the head node, like the TensorBoard files.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from urllib.parse import urlparse

from kd_ray.config import load_config
from kd_ray.config.checks import is_uri
from kd_ray.errors import ConfigError, first_line
from kd_ray.log import get
from kd_ray.storage import location

RUN_ID_FILE = "mlflow_run_id"
MLFLOW_FIX = "pip install 'kd_ray[mlflow]' (or set run.tracker=tensorboard)"


def tracking_uri(cfg) -> str:
    """``run.tracking_uri``, or a local ``mlruns/`` folder under ``run.storage`` (under the
    working folder when the storage is a bucket) as a file: URI."""
    if cfg.run.tracking_uri:
        uri = cfg.run.tracking_uri
        return uri if ":" in uri else Path(uri).expanduser().resolve().as_uri()  # a bare folder
    base = Path.cwd() if is_uri(cfg.run.storage) else Path(cfg.run.storage).expanduser()
    return (base.resolve() / "mlruns").as_uri()


def allow_file_store(uri: str) -> None:
    """MLflow 3 refuses its file store unless asked (it prefers a database); a local ``mlruns/``
    needs no server or database, so kd_ray asks, in each process that writes to one."""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _need_mlflow() -> None:
    # find_spec, not import: MLflow takes seconds to import and the driver's checks stay fast
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"run.tracker=mlflow needs MLflow: {MLFLOW_FIX}")


def check_tracker(cfg) -> None:
    """Refuse, before Ray starts, a tracker whose package is missing, a file: store that cannot be
    written and a server that does not answer."""
    if cfg.run.tracker != "mlflow":
        return
    _need_mlflow()
    uri = tracking_uri(cfg)
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        folder = Path(parsed.path)
        for parent in (folder, *folder.parents):
            if parent.exists():
                if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                    raise ConfigError(f"run.tracking_uri {uri}: {parent} is not a writable folder: "
                                      "set run.tracking_uri to a folder you can write")
                return
    elif parsed.scheme in ("http", "https"):
        import urllib.error  # local: only a server URI needs them (the CLI's checks stay fast)
        import urllib.request

        try:
            urllib.request.urlopen(uri, timeout=5).close()
        except urllib.error.HTTPError:
            return  # the server answered (a 404 at its root is fine)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"run.tracking_uri {uri} is unreachable ({reason}): start the MLflow "
                              "server, or fix run.tracking_uri (a file: URI needs no server)") from None


def flatten(cfg_dict: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}`` (MLflow params are flat strings)."""
    flat = {}
    for key, value in cfg_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]  # MLflow's limit on a param value
    return flat


class StageTracker:
    """Picklable (it travels to the Ray Train controller); the client is made where it logs."""

    def __init__(self, uri: str, experiment: str, run_dir, params: dict):
        self.uri, self.experiment, self.run_dir = uri, experiment, str(run_dir)
        self.params = params
        self._client = self._run_id = None

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    def run_id(self) -> str:
        """This run folder's MLflow run: the one in ``mlflow_run_id``, else a new one."""
        if self._run_id is None:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            allow_file_store(self.uri)
            self._client = MlflowClient(self.uri)
            id_file = location(self.run_dir) / RUN_ID_FILE  # a local folder or the run's bucket
            if id_file.is_file():
                self._run_id = id_file.read_text().strip()
                self._client.update_run(self._run_id, status="RUNNING")
                return self._run_id
            exp = self._client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else self._client.create_experiment(self.experiment)
            run = self._client.create_run(exp_id, run_name=id_file.parent.name)
            params = [Param(k, v) for k, v in sorted(self.params.items())]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self._client.log_batch(run.info.run_id, params=params[i:i + 100])
            if isinstance(id_file, Path):
                id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run.info.run_id)
            self._run_id = run.info.run_id
        return self._run_id

    def log_epoch(self, row: dict) -> None:
        from mlflow.entities import Metric

        from kd_ray.runs.files import ATTEMPT_KEYS  # local: runs.files loads torch

        run_id = self.run_id()
        step, now = int(row.get("epoch", 0)), int(time.time() * 1000)
        skip = ("epoch", *ATTEMPT_KEYS)
        metrics = [Metric(k, float(v), now, step) for k, v in row.items()
                   if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if metrics:
            self._client.log_batch(run_id, metrics=metrics)

    def finish(self, summary: dict) -> None:
        """The run's summary as an artifact; the MLflow run marked finished."""
        run_id = self.run_id()
        self._client.log_text(run_id, json.dumps(summary, indent=2, default=str), "summary.json")
        self._client.set_terminated(run_id, status="FINISHED")


def stage_tracker(cfg, run_dir, experiment: str | None = None) -> StageTracker | None:
    if cfg.run.tracker != "mlflow":
        return None
    return StageTracker(tracking_uri(cfg), experiment or cfg.run.name, run_dir, flatten(cfg.to_dict()))


def log_comparison(cfg, root: Path, files) -> None:
    """The pipeline's comparison table and plots, in an MLflow run named like the pipeline (its id
    in ``<pipeline>/mlflow_run_id``), beside the runs of its stages."""
    if cfg.run.tracker != "mlflow":
        return
    tracker = StageTracker(tracking_uri(cfg), cfg.run.name, root, flatten(cfg.to_dict()))
    run_id = tracker.run_id()
    for name in files:
        path = root / name
        if isinstance(path, Path) and path.is_file():  # a bucket's files stay there
            tracker._client.log_artifact(run_id, str(path))
    tracker._client.set_terminated(run_id, status="FINISHED")


def log_export(run_dir, out=None, which: str = "student") -> list[str]:
    """``kd-ray export`` of a run tracked in MLflow: the exported file and its JSON as artifacts
    (under ``export/``) of the run's MLflow run. A tracker that fails now only warns: the file is
    written already."""
    run_dir = Path(run_dir)
    id_file, cfg_file = run_dir / RUN_ID_FILE, run_dir / "config.yaml"
    if is_uri(run_dir) or not id_file.is_file() or not cfg_file.is_file():
        return []
    cfg = load_config(cfg_file)
    if cfg.run.tracker != "mlflow":
        return []
    files = ([Path(out), Path(f"{out}.json")] if out else
             sorted((run_dir / "export").glob(f"{which}.*")))
    files = [f for f in files if f.is_file()]
    uri = tracking_uri(cfg)
    try:
        allow_file_store(uri)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        for path in files:
            client.log_artifact(id_file.read_text().strip(), str(path), "export")
    except Exception as exc:  # noqa: BLE001 (any tracker failure: the export itself succeeded)
        get(__name__).warning(f"export not logged to MLflow at {uri}: "
                              f"{first_line(exc)}")
        return []
    return [path.name for path in files]
