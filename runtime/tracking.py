"""MLflow plumbing in one place: one parent run per pipeline, a child run per stage.

Everything goes through an explicit `MlflowClient` and explicit run ids (no global active-run state), so
Ray workers can log step metrics to their stage's run by id. The experiment is created here, in the parent
process, before any worker logs (concurrent first writers race on a fresh SQLite store).

Liveness: every open run carries a heartbeat tag (`vlmlab.heartbeat`, unix time) that a daemon thread refreshes every
`VLMLAB_HEARTBEAT_S` seconds; `reap_stale()` marks KILLED the RUNNING runs whose heartbeat is older than
`VLMLAB_STALE_AFTER_S`, from any host. A run marked so while it was only offline is set RUNNING again by its own
next successful heartbeat, and `harness sync` replays its real end status.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from evals.registry import TASKS
from runtime.atomic import atomic_write
from runtime.errors import UserError
from runtime.secrets import redact_text

MAX_PARAM_LEN = 6000
PENDING = "pending-"  # prefix of run ids created while the store was unreachable
# A saved view of the MLflow UI's runs table with the cost and accuracy columns shown (MLflow hides metric columns
# by default). It appears under "Views" and opens directly at `#/experiments/<id>/runs?viewStateShareKey=<key>`.
COST_VIEW_KEY = "vlmlab-cost"
COST_VIEW_METRICS = ("eval/mean_accuracy", *(f"eval/{t.metric}" for t in TASKS.values()), "cost/usd",
                     "cost/accelerator_hours", "cost/busy_hours", "cost/utilization")
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
OUTBOX, WORKER_OUTBOX = "mlflow_outbox.jsonl", "mlflow_outbox_worker.jsonl"
SYNC_PROGRESS = "mlflow_outbox.progress"  # in the run directory: lines replayed per outbox, placeholder -> real ids
HEARTBEAT_TAG = "vlmlab.heartbeat"  # unix time of the run's last heartbeat
HEARTBEAT_S_TAG = "vlmlab.heartbeat_s"  # the interval its writer uses
REAPED_TAG = "vlmlab.reaped"  # why another process marked the run KILLED
PENDING_TAG = "vlmlab.pending_id"  # the outbox placeholder id a run was created by `harness sync` for
OUTBOX_OPS = {"create_run": ("experiment_id", "run_name", "tags"), "log_batch": (), "log_artifact": ("local_path",),
              "set_terminated": ("status",)}  # each outbox write and the keys it needs besides op and run_id


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def store_exists(uri: str) -> bool:
    """False for a SQLite store whose file is missing (reading it would create an empty one)."""
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()


class Tracker:
    """MLflow writes for one process. If the store becomes unreachable mid-run, every later write goes to an
    outbox file in the run directory (`attach_outbox`) instead, and `harness sync RUN_DIR` replays it."""

    def __init__(self, uri: str, experiment: str):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
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
        self._lock = threading.RLock()  # _open, and a run's end vs. its heartbeat restoring it
        self._beater: threading.Thread | None = None
        self.heartbeat_s = env_seconds("VLMLAB_HEARTBEAT_S", 30.0)
        self.stale_after_s = env_seconds("VLMLAB_STALE_AFTER_S", 180.0)
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
        if op == "log_artifact":  # relative to the run dir: a moved run dir still syncs, and sync checks it
            kwargs["local_path"] = os.path.relpath(kwargs["local_path"], self.outbox.parent)
        with _private_append(self.outbox) as f:
            f.write(json.dumps({"op": op, **kwargs}, default=_entity_json) + "\n")
        return None

    def _go_offline(self, exc: Exception) -> None:
        """Only a store that cannot be reached sends the run offline; a write it refuses fails the run."""
        if self.outbox is None or not is_unreachable(exc):
            raise exc
        self.offline = True
        self.warn(f"mlflow: tracking store unreachable ({type(exc).__name__}); the run goes on and keeps its "
                  f"metrics in {self.outbox} - run `harness sync {self.outbox.parent}` once MLflow is back")

    def reap_stale(self, say=None) -> list[str]:
        """Mark KILLED the RUNNING vlmlab runs whose process is gone: on this host (and PID namespace) a process that
        no longer exists; on any host, a heartbeat older than `VLMLAB_STALE_AFTER_S` (at least 3 of its writer's
        intervals). Each gets a `vlmlab.reaped` tag saying why, and a line through ``say``. Returns their ids."""
        host, pidns, now = socket.gethostname(), _pidns(), time.time()
        reaped = []
        for run in self._search("attributes.status = 'RUNNING'"):
            tags = run.data.tags
            if "vlmlab.host" not in tags:
                continue  # not a vlmlab run
            why = None
            pid = int(_number(tags.get("vlmlab.pid")) or 0)
            here = tags["vlmlab.host"] == host and tags.get("vlmlab.pidns", pidns) == pidns
            if here and pid and not _alive(pid):
                why = f"process {pid} on {host} no longer exists"
            elif (beat := _number(tags.get(HEARTBEAT_TAG))) is not None:
                age = now - beat
                if age > max(self.stale_after_s, 3 * (_number(tags.get(HEARTBEAT_S_TAG)) or 0)):
                    why = f"no heartbeat for {age:.0f} s from pid {tags.get('vlmlab.pid')} on {tags['vlmlab.host']}"
            if why:  # the tag first: a run that comes back sees why it was marked, and undoes it
                self.client.set_tag(run.info.run_id, REAPED_TAG, why)
                self.client.set_terminated(run.info.run_id, status="KILLED")
                reaped.append(run.info.run_id)
                if say is not None:
                    say(f"mlflow: run {run.info.run_id} whose process stopped (no heartbeat) marked KILLED")
        return reaped

    def _search(self, query: str):
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000,
                                           page_token=token)
            yield from page
            if not (token := page.token):
                return

    def start(self, name: str, parent_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        all_tags = {"vlmlab.host": socket.gethostname(), "vlmlab.pid": str(os.getpid()), "vlmlab.pidns": _pidns(),
                    HEARTBEAT_TAG: f"{time.time():.0f}", HEARTBEAT_S_TAG: f"{self.heartbeat_s:g}", **(tags or {})}
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
        with self._lock:
            self._open.append(run_id)
            if self._beater is None:
                self._beater = threading.Thread(target=self._beat_loop, name="vlmlab-heartbeat", daemon=True)
                self._beater.start()
        return run_id

    def _beat_loop(self) -> None:
        """Refresh the heartbeat of every open run until none is open."""
        while True:
            time.sleep(self.heartbeat_s)
            with self._lock:
                if not self._open:
                    self._beater = None
                    return
                live = [r for r in self._open if not r.startswith(PENDING)]  # pending runs are not in the store
            for run_id in live:
                self._beat(run_id)

    def _beat(self, run_id: str) -> None:
        """Write one heartbeat straight to the store (never to the outbox); if another process marked the run
        KILLED meanwhile (its heartbeats could not get through), set it RUNNING again."""
        try:
            self.client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            run = self.client.get_run(run_id)
            if run.info.status != "KILLED" or REAPED_TAG not in run.data.tags:
                return
            with self._lock:  # end() holds it too: a run this process just ended is not revived
                if run_id in self._open:
                    self.client.delete_tag(run_id, REAPED_TAG)  # first: RUNNING then means fully restored
                    self.client.update_run(run_id, status="RUNNING")
                    self.warn(f"mlflow: run {run_id} had been marked KILLED ({run.data.tags[REAPED_TAG]}); it is "
                              "reachable again and back to RUNNING")
        except Exception:  # the store is away: the run's own writes notice it and go to the outbox
            pass

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
            try:
                self.client.log_figure(run_id, figure, name)
            except Exception as exc:  # a figure is not queued; the files it was drawn from are
                self._go_offline(exc)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        with self._lock:
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


def outbox_files(run_dir: Path) -> list[Path]:
    """A run's outboxes: the driver's first (it creates the runs), then each training stage's workers'."""
    return [p for p in [run_dir / OUTBOX, *sorted(run_dir.glob(f"*/{WORKER_OUTBOX}"))] if p.is_file()]


class _BadLine(Exception):
    """An outbox line that cannot be replayed as written; it is set aside, the rest is replayed."""


def sync_outbox(uri: str, run_dir: Path, warn=print) -> int:
    """Replay a run's outboxes into the store, in order; placeholder run ids become real runs. Returns #writes.

    Idempotent: a run it creates is tagged with its placeholder id and found by it before any create, so a re-sync
    (even one that lost its progress file) never duplicates a run; MLflow drops repeated metrics, and params and tags
    repeat their values. Progress is saved atomically after every line, so a sync that stops part-way resumes
    there. A corrupt line (truncated write, not UTF-8, not an outbox write) or an artifact outside the run directory
    is moved to `<outbox>.corrupt` with a warning. The outboxes are removed once fully replayed."""
    from mlflow.tracking import MlflowClient


    run_dir = Path(run_dir).resolve()
    files = outbox_files(run_dir)
    _check_server(uri)  # a dead server: one clear line in seconds, before any replay
    client = MlflowClient(tracking_uri=uri)
    progress_file = run_dir / SYNC_PROGRESS
    try:
        progress = json.loads(progress_file.read_text())
    except (OSError, ValueError):  # none, or unreadable: start over (idempotent)
        progress = {}
    if not (isinstance(progress, dict) and isinstance(progress.get("ids"), dict)
            and isinstance(progress.get("done"), dict)):
        progress = {"ids": {}, "done": {}}
    total = 0
    for path in files:
        name = path.relative_to(run_dir).as_posix()
        lines = path.read_bytes().split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        for n in range(progress["done"].get(name, 0), len(lines)):
            try:
                entry = _parse_line(lines[n], run_dir, progress["ids"])
            except _BadLine as bad:
                with _private_append(path.with_name(path.name + ".corrupt"), "ab") as f:
                    f.write(lines[n] + b"\n")  # as it was, bytes and all
                warn(f"{name} line {n + 1} {bad}: moved to {path.name}.corrupt; the rest is replayed")
            else:
                try:
                    _replay(client, entry, progress["ids"], warn)
                except Exception as exc:
                    why = "the store became unreachable" if is_unreachable(exc) else "the store refused it"
                    raise UserError(f"sync stopped at {name} line {n + 1} ({entry['op']}): {why}: "
                                    f"{redact_text(str(exc))[:500]}; the {total} writes before it are saved, run "
                                    f"`harness sync {run_dir}` again to resume") from None
                total += 1
            progress["done"][name] = n + 1
            atomic_write(progress_file, json.dumps(progress))
    for path in files:
        path.unlink()
    progress_file.unlink(missing_ok=True)
    return total


def _parse_line(raw: bytes, run_dir: Path, ids: dict) -> dict:
    """One outbox line -> a checked write, MLflow entities built; raises _BadLine saying what is wrong with it."""
    from mlflow.entities import Metric, Param

    try:
        entry = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _BadLine("is not UTF-8") from None
    except ValueError:
        raise _BadLine("is not JSON (a truncated write?)") from None
    try:
        op, run_id = entry["op"], entry["run_id"]
        if op not in OUTBOX_OPS:
            raise _BadLine(f"has an unknown operation {str(op)[:40]!r}")
        if not isinstance(run_id, str) or any(key not in entry for key in OUTBOX_OPS[op]):
            raise TypeError
        if op == "create_run":
            if not re.fullmatch(f"{PENDING}[0-9a-f]{{32}}", run_id):
                raise _BadLine(f"creates a run with a malformed placeholder id {run_id[:60]!r}")
            entry["tags"] = {str(k): str(v) for k, v in entry["tags"].items()}
        elif run_id.startswith(PENDING) and run_id not in ids:
            raise _BadLine(f"writes to run {run_id}, whose creation is not in the outbox")
        elif op == "log_batch":
            entry["metrics"] = [Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"]))
                                for m in entry.get("metrics", [])]
            entry["params"] = [Param(p["key"], str(p["value"])) for p in entry.get("params", [])]
            entry["tags"] = {str(t["key"]): str(t["value"]) for t in entry.get("tags", [])}
        elif op == "log_artifact":
            local = (run_dir / entry["local_path"]).resolve()  # an absolute path stays absolute
            if not local.is_relative_to(run_dir):
                raise _BadLine(f"names {entry['local_path']!r}, outside the run directory {run_dir}: refused "
                               "(only the run's own files are uploaded)")
            entry["local_path"] = str(local)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise _BadLine("is not a complete outbox write") from None
    return entry


def _replay(client, entry: dict, ids: dict, warn) -> None:
    """Apply one checked outbox write; ``ids`` maps placeholder ids to the runs created for them."""
    from mlflow.entities import RunTag

    op = entry["op"]

    def real(run_id: str) -> str:
        return ids.get(run_id, run_id)

    if op == "create_run":
        pending = entry["run_id"]
        found = client.search_runs([entry["experiment_id"]], f"tags.`{PENDING_TAG}` = '{pending}'", max_results=1)
        if found:  # an earlier sync created it, then lost its progress
            ids[pending] = found[0].info.run_id
            return
        tags = {k: real(v) if k == "mlflow.parentRunId" else v for k, v in entry["tags"].items()}
        ids[pending] = client.create_run(entry["experiment_id"], run_name=entry["run_name"],
                                         tags=tags | {PENDING_TAG: pending}).info.run_id
    elif op == "log_batch":
        tags = [RunTag(k, real(v) if k == "mlflow.parentRunId" else v) for k, v in entry["tags"].items()]
        client.log_batch(real(entry["run_id"]), metrics=entry["metrics"], params=entry["params"], tags=tags)
    elif op == "log_artifact":
        client.log_artifact(real(entry["run_id"]), entry["local_path"], entry.get("artifact_path"))
    elif op == "set_terminated":
        run_id = real(entry["run_id"])
        reaped = client.get_run(run_id).data.tags.get(REAPED_TAG)
        client.set_terminated(run_id, status=entry["status"])
        if reaped:  # marked KILLED while it was only offline: the outbox knows how it really ended
            client.delete_tag(run_id, REAPED_TAG)
            warn(f"run {run_id} had been marked KILLED ({reaped}) while it was offline; its status is now "
                 f"{entry['status']}")


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) means the store could not be reached - refused or dropped connections,
    timeouts, a server answering 5xx until MLflow's retries ran out, a database that cannot be opened or is
    locked - rather than a write the store refused, which must fail the run."""
    import requests

    kinds: list[type] = [requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError,
                         ConnectionError, TimeoutError, sqlite3.OperationalError]
    try:
        from sqlalchemy.exc import OperationalError
        kinds.append(OperationalError)
    except ImportError:
        pass
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, tuple(kinds)):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        value = default if raw is None else float(raw)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise UserError(f"{name} must be a positive number of seconds (got {raw!r})")
    return value


def _number(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _pidns() -> str:
    """This process's PID namespace: a PID means the same process only within one (containers share hostnames)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any accelerator time) when a tracking server does not answer, and bound MLflow's own
    retries to seconds (its defaults retry a dead server for minutes)."""
    import requests

    if not uri.startswith(("http://", "https://")):
        return
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
    except requests.RequestException as exc:
        raise UserError(f"MLflow tracking server {redact_text(uri)} is unreachable ({type(exc).__name__}); start "
                        "it or set MLFLOW_TRACKING_URI / tracking.uri to a reachable store") from None


def latest_step(client, run_id: str, prefix: str, total: int, global_batch: int) -> dict | None:
    """A training stage's last step streamed to its MLflow run, as the console's progress state; None before the
    first log. GRPO's reward before the loss, as rank 0's progress file has it."""
    for key in ("reward", "loss"):
        history = client.get_metric_history(run_id, f"{prefix}/{key}")
        if history:
            last = max(history, key=lambda m: m.step)
            return {"label": prefix, "step": last.step, "total": total, "metric": [key, last.value],
                    "global_batch": global_batch}
    return None


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
    except Exception as exc:
        if outbox is None or not is_unreachable(exc):  # only a lost store is worth queueing for; not a refusal
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


def _private_append(path, mode: str = "a") -> TextIO:
    """Open ``path`` for appending, created readable by its owner only (an outbox holds run data)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), mode)


def _append(outbox: str, run_id: str, items: list) -> None:
    with _private_append(outbox) as f:
        f.write(json.dumps({"op": "log_batch", "run_id": run_id, "metrics": items}, default=_entity_json) + "\n")
