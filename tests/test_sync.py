"""`harness sync` and the tracker's offline fallback, against a real `mlflow server` on 127.0.0.1.

An outage is made for real: the tracker talks to the server through a TCP forwarder (`Partition`) that the test
cuts and restores, while the server itself keeps running. Each outbox is the one a real offline `Tracker` wrote.
"""
from __future__ import annotations

import json
import shutil
import socket
import time

import pytest
from helpers import Partition, free_port
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from runtime.errors import UserError
from runtime.tracking import OUTBOX, PENDING_TAG, SYNC_PROGRESS, Tracker, log_step_metrics, sync_outbox


@pytest.fixture
def quick_http(monkeypatch):
    """A cut connection fails at once instead of after MLflow's retries (a slow answer is still waited for)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def offline_run(server_port: int, run_dir, experiment: str, write) -> tuple[Tracker, Partition, list[str]]:
    """A tracker whose store goes away right after it starts; ``write(tracker)`` then logs (to the outbox)."""
    part = Partition(server_port)
    tracker = Tracker(part.uri, experiment)
    warnings: list[str] = []
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker.attach_outbox(run_dir / OUTBOX, warn=warnings.append)
    part.down()
    write(tracker)
    assert tracker.offline and (run_dir / OUTBOX).exists()
    return tracker, part, warnings


def runs_of(client: MlflowClient, experiment: str) -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=100)


def test_a_resync_after_a_lost_progress_file_creates_no_second_run(mlflow_server, tmp_path, quick_http):
    run_dir = tmp_path / "run"

    def write(tracker):
        parent = tracker.start("pipeline")  # offline: a placeholder id, created by the sync
        child = tracker.start("sft", parent_id=parent)
        tracker.log_params(child, {"lr": 0.1})
        tracker.log_metrics(child, {"loss": 0.5}, step=1)
        (run_dir / "stage.json").write_text("{}")
        tracker.log_artifact(child, str(run_dir / "stage.json"))
        tracker.end(child)
        tracker.end(parent)

    offline_run(mlflow_server.port, run_dir, "idempotent", write)
    outbox = (run_dir / OUTBOX).read_bytes()
    uri = mlflow_server.uri
    assert sync_outbox(uri, run_dir) == 7
    assert not (run_dir / OUTBOX).exists() and not (run_dir / SYNC_PROGRESS).exists()

    (run_dir / OUTBOX).write_bytes(outbox)  # the same outbox again, its progress lost
    assert sync_outbox(uri, run_dir) == 7

    client = MlflowClient(uri)
    runs = runs_of(client, "idempotent")
    assert sorted(r.info.run_name for r in runs) == ["pipeline", "sft"]
    child = next(r for r in runs if r.info.run_name == "sft")
    parent = next(r for r in runs if r.info.run_name == "pipeline")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags[PENDING_TAG].startswith("pending-")
    assert [m.value for m in client.get_metric_history(child.info.run_id, "loss")] == [0.5]
    assert child.data.params == {"lr": "0.1"} and child.info.status == parent.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["stage.json"]


def test_a_sync_stopped_part_way_resumes_from_its_saved_progress(mlflow_server, tmp_path, quick_http):
    """The store refuses line 4 (a param logged again with another value): the sync stops there, naming it, with
    lines 1-3 saved; with that line removed, the next sync resumes at it and writes nothing twice."""
    run_dir = tmp_path / "run"

    def write(tracker):
        run = tracker.start("sft")
        tracker.log_params(run, {"lr": 0.1})
        tracker.log_metrics(run, {"loss": 0.5}, step=0)
        tracker.log_params(run, {"lr": 0.2})  # MLflow never changes a logged param
        tracker.log_metrics(run, {"loss": 0.25}, step=1)
        tracker.end(run)

    offline_run(mlflow_server.port, run_dir, "resume", write)
    uri = mlflow_server.uri
    with pytest.raises(UserError, match=r"sync stopped at mlflow_outbox.jsonl line 4 \(log_batch\): the store "
                                        r"refused it: .*lr.*the 3 writes before it are saved"):
        sync_outbox(uri, run_dir)
    assert json.loads((run_dir / SYNC_PROGRESS).read_text())["done"] == {OUTBOX: 3}
    assert sorted(p.name for p in run_dir.iterdir()) == [OUTBOX, SYNC_PROGRESS]  # no temporary file left over

    lines = (run_dir / OUTBOX).read_text().splitlines(keepends=True)
    (run_dir / OUTBOX).write_text("".join(lines[:3] + lines[4:]))
    assert sync_outbox(uri, run_dir) == 2
    client = MlflowClient(uri)
    [run] = runs_of(client, "resume")
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(0, 0.5), (1, 0.25)]
    assert run.data.params == {"lr": "0.1"} and run.info.status == "FINISHED"


def test_corrupt_outbox_lines_are_quarantined_and_the_rest_replayed(mlflow_server, tmp_path, quick_http):
    run_dir = tmp_path / "run"

    def write(tracker):
        run = tracker.start("sft")
        for step in range(4):
            tracker.log_metrics(run, {"loss": 1.0 / (step + 1)}, step=step)
        tracker.end(run)

    offline_run(mlflow_server.port, run_dir, "corrupt", write)
    lines = (run_dir / OUTBOX).read_bytes().split(b"\n")[:-1]  # create, 4 metrics, end
    truncated, garbage, unknown_run = lines[2][:40], b"\xff\xfe not utf-8", lines[3].replace(b"pending-", b"pending-0")
    (run_dir / OUTBOX).write_bytes(b"\n".join([lines[0], lines[1], truncated, garbage, unknown_run, *lines[3:5]])
                                   + b"\n" + lines[5][:25])  # and the last line (the run's end) cut off mid-write
    warnings: list[str] = []
    assert sync_outbox(mlflow_server.uri, run_dir, warn=warnings.append) == 4

    assert [w.split(":")[0] for w in warnings] == [
        "mlflow_outbox.jsonl line 3 is not JSON (a truncated write?)", "mlflow_outbox.jsonl line 4 is not UTF-8",
        f"mlflow_outbox.jsonl line 5 writes to run {json.loads(unknown_run)['run_id']}, whose creation is not in "
        "the outbox", "mlflow_outbox.jsonl line 8 is not JSON (a truncated write?)"]
    assert all(w.endswith("moved to mlflow_outbox.jsonl.corrupt; the rest is replayed") for w in warnings)
    quarantine = run_dir / (OUTBOX + ".corrupt")
    assert quarantine.read_bytes() == b"\n".join([truncated, garbage, unknown_run, lines[5][:25]]) + b"\n"
    assert quarantine.stat().st_mode & 0o077 == 0
    client = MlflowClient(mlflow_server.uri)
    [run] = runs_of(client, "corrupt")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [0, 2, 3]
    assert run.info.status == "RUNNING"  # its set_terminated was the line cut off


def test_only_a_lost_connection_sends_a_run_offline(mlflow_server, tmp_path, quick_http):
    """A write the store refuses fails loudly and the run ends FAILED, with no outbox; a cut connection sends the
    run offline. The same holds for the Ray workers' step metrics."""
    part = Partition(mlflow_server.port)
    tracker = Tracker(part.uri, "offline-only")
    warnings: list[str] = []
    tracker.attach_outbox(tmp_path / OUTBOX, warn=warnings.append)
    refused = tracker.start("refused")
    with pytest.raises(MlflowException, match="lr"):
        with tracker.closing_on_error():
            tracker.log_params(refused, {"lr": 0.1})
            tracker.log_params(refused, {"lr": 0.2})
    assert not tracker.offline and not (tmp_path / OUTBOX).exists() and not warnings
    assert tracker.client.get_run(refused).info.status == "FAILED"

    worker_outbox = tmp_path / "mlflow_outbox_worker.jsonl"
    with pytest.raises(MlflowException, match="not found|does not exist"):  # a run the store does not have
        log_step_metrics(part.uri, "0" * 32, {"loss": 1.0}, 0, outbox=str(worker_outbox))
    assert not worker_outbox.exists()

    lost = tracker.start("lost")
    part.down()
    tracker.log_metrics(lost, {"loss": 1.0})
    log_step_metrics(part.uri, lost, {"loss": 2.0}, 1, outbox=str(worker_outbox))
    assert tracker.offline and len(warnings) == 1 and "tracking store unreachable" in warnings[0]
    assert json.loads((tmp_path / OUTBOX).read_text())["run_id"] == lost
    assert json.loads(worker_outbox.read_text())["metrics"][0]["value"] == 2.0


def test_sync_uploads_artifacts_only_from_inside_the_run_dir(mlflow_server, tmp_path, quick_http):
    """Outbox lines naming a file outside the run directory (absolute, `..`, or a symlink out of it) are refused;
    the run's own file is uploaded, also after the run directory was moved."""
    run_dir = tmp_path / "run"
    secret = tmp_path / "secret.txt"
    secret.write_text("not for MLflow")

    def write(tracker):
        run = tracker.start("sft")
        (run_dir / "stage.json").write_text("{}")
        (run_dir / "link.txt").symlink_to(secret)
        for path in (run_dir / "stage.json", run_dir / ".." / "secret.txt", run_dir / "link.txt"):
            tracker.log_artifact(run, str(path))
        tracker.end(run)

    offline_run(mlflow_server.port, run_dir, "artifacts", write)
    lines = (run_dir / OUTBOX).read_text().splitlines(keepends=True)
    absolute = json.loads(lines[1]) | {"local_path": str(secret)}  # as an older or a tampered outbox has it
    (run_dir / OUTBOX).write_text("".join(lines[:-1]) + json.dumps(absolute) + "\n" + lines[-1])
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(run_dir, moved)
    warnings: list[str] = []
    assert sync_outbox(mlflow_server.uri, moved, warn=warnings.append) == 3
    named = [w.split(" names ")[1].split(",")[0] for w in warnings]
    assert named == ["'../secret.txt'", "'link.txt'", repr(str(secret))]
    assert all(f"outside the run directory {moved.resolve()}: refused" in w for w in warnings)
    client = MlflowClient(mlflow_server.uri)
    [run] = runs_of(client, "artifacts")
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["stage.json"]


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_sync_against_a_dead_server_fails_in_seconds(workdir, monkeypatch, kind):
    """Nothing listening, or a server that accepts connections and never answers: one clear line within seconds
    (MLflow's own retries took 249 s), with MLflow's HTTP settings left at their defaults."""
    from harness.cli import app

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    (workdir / "run").mkdir()
    entry = {"op": "set_terminated", "run_id": "0" * 32, "status": "FINISHED"}
    (workdir / "run" / OUTBOX).write_text(json.dumps(entry) + "\n")
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody reads
    port = silent.getsockname()[1] if kind == "silent" else free_port()
    try:
        start = time.monotonic()
        result = CliRunner().invoke(app, ["sync", str(workdir / "run"), "--tracking-uri", f"http://127.0.0.1:{port}"])
        took = time.monotonic() - start
    finally:
        silent.close()
    assert result.exit_code == 2, result.output
    reason = "ConnectionError" if kind == "refused" else "ReadTimeout"
    message = " ".join(result.output.split())
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable ({reason})" in message
    assert took < 15, took
    assert (workdir / "run" / OUTBOX).exists()  # nothing lost
