"""MLflow plumbing in one place: one parent run per pipeline, a child run per stage.

Everything goes through an explicit `MlflowClient` and explicit run ids (no global active-run state), so
Ray workers can log step metrics to their stage's run by id. The experiment is created here, in the parent
process, before any worker logs (concurrent first writers race on a fresh SQLite store).
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from harness.errors import UserError
from harness.secrets import redact_text

MAX_PARAM_LEN = 6000
PENDING = "pending-"  # prefix of run ids created while the store was unreachable
# A saved view of the MLflow UI's runs table with the cost and accuracy columns shown (MLflow hides metric columns
# by default). It appears under "Views" and opens directly at `#/experiments/<id>/runs?viewStateShareKey=<key>`.
COST_VIEW_KEY = "vlmlab-cost"
COST_VIEW_METRICS = ("eval/mean_accuracy", "eval/vqa_accuracy", "eval/chartqa_relaxed_accuracy", "cost/usd",
                     "cost/accelerator_hours", "cost/busy_hours", "cost/utilization")
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


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
    """MLflow writes for one process. If the store becomes unreachable mid-run, every later write goes to an
    outbox file in the run directory (`attach_outbox`) instead, and `harness sync RUN_DIR` replays it."""

    def __init__(self, uri: str, experiment: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        for key, value in HTTP_DEFAULTS.items():  # fail over in seconds, not minutes of retries
            os.environ.setdefault(key, value)
        self.uri = uri
        if uri.startswith(("http://", "https://")):
            _check_server(uri)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        except Exception as exc:  # unreachable server, unwritable DB...
            raise UserError(f"MLflow tracking store {redact_text(uri)!r} is not usable: "
                            f"{redact_text(str(exc))}") from None
        publish_cost_view(self.client, self.experiment_id)
        if uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]).is_file():
            os.chmod(uri[len("sqlite:///"):], 0o600)  # the store holds params, tags, artifact paths: owner only
        self._open: list[str] = []
        self.outbox: Path | None = None
        self.offline = False
        self.warn = print

    def attach_outbox(self, path: Path, warn=print) -> None:
        self.outbox, self.warn = path, warn

    def _write(self, op: str, **kwargs):
        """Run one client write, or queue it in the outbox once the store has failed."""
        if not self.offline:
            try:
                return getattr(self.client, op)(**kwargs)
            except Exception as exc:
                self._go_offline(exc)
        with _private_append(self.outbox) as f:
            f.write(json.dumps({"op": op, **kwargs}, default=_entity_json) + "\n")
        return None

    def _go_offline(self, exc: Exception) -> None:
        if self.outbox is None:
            raise exc
        self.offline = True
        self.warn(f"mlflow: tracking store unreachable ({type(exc).__name__}); the run goes on and keeps its "
                  f"metrics in {self.outbox} - run `harness sync {self.outbox.parent}` once MLflow is back")

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
        if not self.offline:
            try:
                run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
            except Exception as exc:
                self._go_offline(exc)
        if self.offline:  # a placeholder id; `harness sync` creates the run and maps the id
            run_id = f"{PENDING}{uuid.uuid4().hex}"
            self._write("create_run", run_id=run_id, experiment_id=self.experiment_id, run_name=name, tags=all_tags)
        self._open.append(run_id)
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact_text(str(v))[:MAX_PARAM_LEN]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._write("log_batch", run_id=run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        items = _metrics(metrics, step)
        for i in range(0, len(items), 500):
            self._write("log_batch", run_id=run_id, metrics=items[i:i + 500])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._write("log_batch", run_id=run_id, tags=[RunTag(k, redact_text(str(v))[:MAX_PARAM_LEN])
                                                      for k, v in flatten(tags).items()])

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self._write("log_artifact", run_id=run_id, local_path=path, artifact_path=artifact_path)

    def log_figure(self, run_id: str, figure, name: str) -> None:
        if not self.offline:
            self.client.log_figure(run_id, figure, name)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self._write("set_terminated", run_id=run_id, status=status)
        if run_id in self._open:
            self._open.remove(run_id)

    @contextmanager
    def closing_on_error(self):
        """Whatever escapes the block closes every open run: KILLED on Ctrl-C/SIGTERM, FAILED otherwise."""
        try:
            yield
        except KeyboardInterrupt:
            self.end_all("KILLED")
            raise
        except BaseException:
            self.end_all("FAILED")
            raise

    def end_all(self, status: str) -> None:
        """Close every run this tracker opened and has not ended (children first)."""
        for run_id in reversed(list(self._open)):
            try:
                self.end(run_id, status)
            except Exception:  # the store itself may be the thing that failed
                pass


def cost_view_url(experiment_id: str) -> str:
    """The MLflow UI fragment that opens the runs table with the cost columns (append to the UI's address)."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={COST_VIEW_KEY}"


def publish_cost_view(client, experiment_id: str) -> None:
    """Store the cost-vs-accuracy view of the runs table as an experiment tag (the format of MLflow's saved views:
    an envelope whose ``state`` is the JSON of the table's UI state). Idempotent; best effort."""
    tag = f"mlflow.sharedViewState.{COST_VIEW_KEY}"
    columns = ["attributes.`Source`", "attributes.`Models`"] + [f"metrics.`{m}`" for m in COST_VIEW_METRICS]
    state = {"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False}
    try:
        current = client.get_experiment(experiment_id).tags.get(tag)
        if current and json.loads(json.loads(current)["state"]) == state:
            return
        now = int(time.time() * 1000)
        client.set_experiment_tag(experiment_id, tag, json.dumps(
            {"name": "vlmlab: cost vs accuracy", "createdAt": now, "updatedAt": now, "state": json.dumps(state)}))
    except Exception:  # a read-only or foreign store still tracks runs; the view is a convenience
        pass


def _metrics(metrics: dict[str, float], step: int) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v)]


def _entity_json(obj):
    """Metric/Param/RunTag -> plain lists for the outbox."""
    if hasattr(obj, "timestamp"):
        return {"kind": "metric", "key": obj.key, "value": obj.value, "timestamp": obj.timestamp, "step": obj.step}
    return {"kind": type(obj).__name__, "key": obj.key, "value": obj.value}


def sync_outbox(uri: str, files: list[Path]) -> int:
    """Replay outbox files into the store, in order; placeholder run ids become real runs. Returns #writes.

    Progress is saved after every write (`<outbox>.progress`), so a sync that fails part-way resumes where
    it stopped when run again; each file is removed once fully replayed."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    progress_file = files[0].with_name(files[0].name + ".progress")
    progress = json.loads(progress_file.read_text()) if progress_file.exists() else {"ids": {}, "done": {}}
    ids = progress["ids"]

    def real(run_id: str) -> str:
        return ids.get(run_id, run_id)

    total = 0
    for path in sorted(files, key=lambda p: (p.name != "mlflow_outbox.jsonl", str(p))):  # the driver's first
        lines = path.read_text().splitlines()
        start = progress["done"].get(str(path), 0)
        for n, line in enumerate(lines[start:], start=start):
            entry = json.loads(line)
            op = entry.pop("op")
            if op == "create_run":
                tags = {k: real(v) if k == "mlflow.parentRunId" else v for k, v in entry["tags"].items()}
                ids[entry["run_id"]] = client.create_run(entry["experiment_id"], run_name=entry["run_name"],
                                                         tags=tags).info.run_id
            elif op == "log_batch":
                metrics = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in entry.get("metrics", [])]
                params = [Param(p["key"], p["value"]) for p in entry.get("params", [])]
                tags = [RunTag(t["key"], real(t["value"]) if t["key"] == "mlflow.parentRunId" else t["value"])
                        for t in entry.get("tags", [])]
                client.log_batch(real(entry["run_id"]), metrics=metrics, params=params, tags=tags)
            elif op == "log_artifact":
                client.log_artifact(real(entry["run_id"]), entry["local_path"], entry.get("artifact_path"))
            elif op == "set_terminated":
                client.set_terminated(real(entry["run_id"]), status=entry["status"])
            progress["done"][str(path)] = n + 1
            progress_file.write_text(json.dumps(progress))
            total += 1
    for path in files:
        path.unlink()
    progress_file.unlink(missing_ok=True)
    return total


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
        raise UserError(f"MLflow tracking server {redact_text(uri)} is unreachable ({type(exc).__name__}); start "
                        "it or set MLFLOW_TRACKING_URI / tracking.uri to a reachable store") from None


def log_step_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int,
                     outbox: str | None = None) -> None:
    """Used from Ray workers: log one step's metrics to a run by id; to ``outbox`` if the store fails."""
    _log_items(uri, run_id, _metrics(metrics, step), outbox)


def _log_items(uri: str, run_id: str, items: list, outbox: str | None) -> None:
    from mlflow.tracking import MlflowClient

    if not items:
        return
    if outbox and (run_id.startswith(PENDING) or Path(outbox).exists()):
        _append(outbox, run_id, items)  # already offline: keep order, skip the timeout
        return
    try:
        MlflowClient(tracking_uri=uri).log_batch(run_id, metrics=items)
    except Exception:
        if outbox is None:
            raise
        _append(outbox, run_id, items)


class BackgroundStepLogger:
    """Logs step metrics from a background thread, in order, so a training step never waits on the store.

    Metrics keep the time they were logged at. ``close()`` waits until everything queued is written (or sent to
    the outbox) and re-raises the first error when there is no outbox to fall back on.
    """

    def __init__(self, uri: str, run_id: str, outbox: str | None = None):
        import queue
        import threading

        self.uri, self.run_id, self.outbox = uri, run_id, outbox
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._drain, name="mlflow-step-logger", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._thread.is_alive():
            self._queue.put(_metrics(metrics, step))
        else:  # after close(): write directly
            _log_items(self.uri, self.run_id, _metrics(metrics, step), self.outbox)

    def _drain(self) -> None:
        while (items := self._queue.get()) is not None:
            try:
                _log_items(self.uri, self.run_id, items, self.outbox)
            except Exception as e:  # only without an outbox; reported by close()
                self._error = self._error or e

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


def _private_append(path) -> TextIO:
    """Open ``path`` for appending, created readable by its owner only (an outbox holds run data)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a")


def _append(outbox: str, run_id: str, items: list) -> None:
    with _private_append(outbox) as f:
        f.write(json.dumps({"op": "log_batch", "run_id": run_id, "metrics": items}, default=_entity_json) + "\n")
