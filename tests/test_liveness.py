"""Liveness across hosts: runs of a process on another host (a subprocess in its own UTS namespace, hostname
`other-host`) are marked KILLED by their stale heartbeat, never by a PID that means nothing here; a run that was
only offline gets its status back. Stores: a real SQLite file shared by both "hosts", or a real `mlflow server`
reached through a `Partition` the test cuts and restores."""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import Partition, stop_session, wait_for
from mlflow.tracking import MlflowClient

from evals.registry import TASKS
from runtime.tracking import HEARTBEAT_TAG, OUTBOX, REAPED_TAG, Tracker, sync_outbox

pytestmark = pytest.mark.slow  # each test runs `harness` for real (scripts/test --fast leaves them out)

OTHER_HOST = r"""
import json, socket, sys
from pathlib import Path
from runtime.tracking import Tracker

uri, experiment, run_dir = sys.argv[1:4]
tracker = Tracker(uri, experiment)
Path(run_dir).mkdir(parents=True, exist_ok=True)
tracker.attach_outbox(Path(run_dir) / "mlflow_outbox.jsonl", warn=lambda text: print("warn:", text, flush=True))
parent = tracker.start("pipeline")
child = tracker.start("sft", parent_id=parent)
print(json.dumps({"host": socket.gethostname(), "runs": [parent, child]}), flush=True)
for command in sys.stdin:
    if command.strip() == "log":
        tracker.log_metrics(child, {"loss": 0.5}, step=1)
        print("offline" if tracker.offline else "online", flush=True)
    elif command.strip() == "end":
        tracker.end(child)
        tracker.end(parent)
        print("ended", flush=True)
"""


class OtherHost:
    """A process on host `other-host` holding a pipeline's parent and child run open, heartbeat every 0.5 s;
    it logs and ends them on command."""

    def __init__(self, uri: str, experiment: str, run_dir, **env):
        self.proc = subprocess.Popen(
            ["unshare", "--uts", "sh", "-c", 'hostname other-host && exec "$@"', "sh",
             sys.executable, "-c", OTHER_HOST, uri, experiment, str(run_dir)],
            env=dict(os.environ, VLMLAB_HEARTBEAT_S="0.5", **env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.said: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line.strip()) for line in self.proc.stdout],
                         daemon=True).start()
        hello = json.loads(self.next_line())
        assert hello["host"] == "other-host" != socket.gethostname()
        self.runs: list[str] = hello["runs"]

    def next_line(self, timeout: float = 120) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"other-host silent for {timeout} s (exit code {self.proc.poll()})") from None
            self.said.append(line)
            if not line.startswith("warn:"):
                return line

    def do(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.next_line()

    def stop(self, sig=signal.SIGKILL) -> None:
        stop_session(self.proc, sig)


def statuses(client: MlflowClient, run_ids: list[str]) -> list[str]:
    return [client.get_run(r).info.status for r in run_ids]


def reap_until(reaper: Tracker, runs: list[str], what: str) -> set[str]:
    """What the reaper marks KILLED until ``runs`` all are (each run's heartbeat goes stale on its own)."""
    reaped: set[str] = set()
    wait_for(lambda: reaped.update(reaper.reap_stale()) or reaped >= set(runs), 60, what)
    return reaped


def test_a_run_killed_on_another_host_is_marked_killed_when_its_heartbeat_stops(workdir, monkeypatch):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    Tracker(uri, "vlmlab")  # the store and experiment exist before several processes write to them
    dead, alive = OtherHost(uri, "vlmlab", workdir / "dead"), OtherHost(uri, "vlmlab", workdir / "alive")
    try:
        dead.stop()
        monkeypatch.setenv("VLMLAB_STALE_AFTER_S", "60")
        assert Tracker(uri, "vlmlab").reap_stale() == []  # its PID is gone here, but that PID was another host's

        monkeypatch.setenv("VLMLAB_STALE_AFTER_S", "4")
        reaper = Tracker(uri, "vlmlab")
        assert reap_until(reaper, dead.runs, "the dead runs' heartbeat to go stale") == set(dead.runs)  # not alive's
        client = reaper.client
        assert statuses(client, dead.runs) == ["KILLED", "KILLED"]
        assert statuses(client, alive.runs) == ["RUNNING", "RUNNING"]
        why = client.get_run(dead.runs[0]).data.tags[REAPED_TAG]
        assert why.startswith("no heartbeat for ") and why.endswith(f" s from pid {dead.proc.pid} on other-host")
        assert alive.do("end") == "ended"
        assert statuses(client, alive.runs) == ["FINISHED", "FINISHED"]
    finally:
        alive.stop()


def test_a_run_marked_killed_while_offline_gets_its_status_back(mlflow_server, tmp_path, monkeypatch):
    """Cut off from the store, a live run on another host is marked KILLED; reconnected, its own heartbeat sets it
    RUNNING again. Cut off again and marked again, it ends offline: `harness sync` replays its real end."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    for name, value in quick.items():
        monkeypatch.setenv(name, value)
    uri = mlflow_server.uri
    Tracker(uri, "offline-host")
    part = Partition(mlflow_server.port)
    other = OtherHost(part.uri, "offline-host", tmp_path / "run")
    try:
        monkeypatch.setenv("VLMLAB_STALE_AFTER_S", "3")
        reaper = Tracker(uri, "offline-host")
        client = reaper.client
        part.down()
        assert other.do("log") == "offline"
        assert reap_until(reaper, other.runs, "the offline runs to be reaped") == set(other.runs)
        assert statuses(client, other.runs) == ["KILLED", "KILLED"]

        part.up()
        wait_for(lambda: statuses(client, other.runs) == ["RUNNING", "RUNNING"], 60, "the runs to come back")
        assert not any(REAPED_TAG in client.get_run(r).data.tags for r in other.runs)
        assert float(client.get_run(other.runs[0]).data.tags[HEARTBEAT_TAG]) > time.time() - 30
        assert reaper.reap_stale() == []

        part.down()
        assert reap_until(reaper, other.runs, "the runs to be reaped again") == set(other.runs)
        assert other.do("end") == "ended"  # to the outbox: the tracker stayed offline
    finally:
        other.stop()
    assert sum("back to RUNNING" in line for line in other.said) == 2  # the parent and the child
    warnings: list[str] = []
    assert sync_outbox(uri, tmp_path / "run", warn=warnings.append) == 3  # the loss, the two ends
    assert statuses(client, other.runs) == ["FINISHED", "FINISHED"]
    assert not any(REAPED_TAG in client.get_run(r).data.tags for r in other.runs)
    assert len(warnings) == 2 and all("had been marked KILLED (no heartbeat for" in w for w in warnings)
    assert [m.value for m in client.get_metric_history(other.runs[1], "loss")] == [0.5]
    assert not (tmp_path / "run" / OUTBOX).exists()


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_harness_run_and_sweep_mark_a_silent_run_of_another_host_killed(workdir, command):
    """The next `harness run` / `harness sweep` on this host marks the runs of a process SIGKILLed on another host
    KILLED once their heartbeat is older than VLMLAB_STALE_AFTER_S. The run is a data-only pipeline (no Ray); the
    sweep (of the sft pipeline: a sweep needs an eval to score its trials) reaps after its pre-flight and before it
    starts Ray, and is stopped once it has."""
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = Tracker(uri, "vlmlab").client
    other = OtherHost(uri, "vlmlab", workdir / "other")
    other.stop()
    wait_for(lambda: float(client.get_run(other.runs[0]).data.tags[HEARTBEAT_TAG]) < time.time() - 4, 60,
             "the heartbeat to go stale")
    data = ["pipelines.d=[data]", "data.tasks.vqa.train_size=16", "data.tasks.vqa.test_size=8",
            "data.tasks.chartqa.train_size=16", "data.tasks.chartqa.test_size=8",
            *(f"data.tasks.{name}=null" for name in TASKS if name not in ("vqa", "chartqa"))]
    args = ["run", "d", *data] if command == "run" else \
        ["sweep", "--pipeline", "sft", *data, "--space", "seed=choice(0)", "--trials", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args, "--output-dir", "runs"], cwd=workdir,
                            env=dict(os.environ, MLFLOW_TRACKING_URI=uri, VLMLAB_STALE_AFTER_S="3"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    said: list[str] = []
    expected = [f"mlflow: run {r} whose process stopped (no heartbeat) marked KILLED" for r in other.runs]
    try:
        for line in proc.stdout:
            said.append(line)
            if command == "sweep" and all(e in " ".join("".join(said).split()) for e in expected):
                break  # what is tested here has happened: stop the sweep
        if command == "run":
            assert proc.wait(timeout=300) == 0, "".join(said)[-3000:]
    finally:
        stop_session(proc)  # the sweep, and its Ray
    flat = " ".join("".join(said).split())
    assert all(e in flat for e in expected), flat[-3000:]
    assert statuses(client, other.runs) == ["KILLED", "KILLED"]
