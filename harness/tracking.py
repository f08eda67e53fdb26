"""MLflow plumbing in one place: one parent run per pipeline, a child run per stage.

Everything goes through an explicit `MlflowClient` and explicit run ids (no global active-run state), so
Ray workers can log step metrics to their stage's run by id. The experiment is created here, in the parent
process, before any worker logs (concurrent first writers race on a fresh SQLite store).
"""
from __future__ import annotations

import math
import os
import socket
import time
from typing import Any

from harness.errors import UserError

MAX_PARAM_LEN = 6000


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class Tracker:
    def __init__(self, uri: str, experiment: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        if uri.startswith(("http://", "https://")):
            _check_server(uri)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        except Exception as exc:  # unreachable server, unwritable DB...
            raise UserError(f"MLflow tracking store {uri!r} is not usable: {exc}") from None
        self._open: list[str] = []

    def reap_stale(self) -> list[str]:
        """Mark KILLED the RUNNING runs whose owning process (on this host) no longer exists, e.g. after a
        SIGKILL or a lost machine. Returns their ids."""
        query = f"attributes.status = 'RUNNING' and tags.`vlmlab.host` = '{socket.gethostname()}'"
        reaped = []
        for run in self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000):
            pid = int(run.data.tags.get("vlmlab.pid", "0") or 0)
            if pid and not _alive(pid):
                self.client.set_terminated(run.info.run_id, status="KILLED")
                reaped.append(run.info.run_id)
        return reaped

    def start(self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        all_tags = {"vlmlab.host": socket.gethostname(), "vlmlab.pid": str(os.getpid()), **(tags or {})}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        self._open.append(run.info.run_id)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(v)]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i:i + 500])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:MAX_PARAM_LEN]) for k, v in flatten(tags).items()])

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
        if run_id in self._open:
            self._open.remove(run_id)

    def end_all(self, status: str) -> None:
        """Close every run this tracker opened and has not ended (children first)."""
        for run_id in reversed(list(self._open)):
            try:
                self.end(run_id, status)
            except Exception:  # the store itself may be the thing that failed
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any accelerator time) when a tracking server does not answer."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
    except requests.RequestException as exc:
        raise UserError(f"MLflow tracking server {uri} is unreachable ({type(exc).__name__}); start it or set "
                        "MLFLOW_TRACKING_URI / tracking.uri to a reachable store") from None


def log_step_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Used from Ray workers: log one step's metrics to a run by id."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and math.isfinite(v)]
    if items:
        MlflowClient(tracking_uri=uri).log_batch(run_id, metrics=items)
