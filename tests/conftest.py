"""Shared fixtures. Ray starts once per test module that needs it (it costs ~30 s on 2 cores)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REALDATA = ROOT.parent / "shared" / "realdata"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def loopback_only() -> bool:
    """True inside a network namespace whose only interface is lo (how scripts/test runs the suite)."""
    return sorted(name for _, name in socket.if_nameindex()) == ["lo"]


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray instance for this module, inside the loopback-only namespace; shut down afterwards."""
    if not loopback_only():
        pytest.fail("Ray tests must run inside a loopback-only network namespace: use scripts/test")
    import ray

    from runtime.raytrain import ensure_ray, reap_hung_actors

    ensure_ray()
    yield
    reap_hung_actors()
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh directory with its own MLflow SQLite store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def stop_session(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 60) -> None:
    """Stop a process we started with ``start_new_session=True`` and everything it started, and wait until all of
    it is gone. Its session, not its process group: Ray gives each worker its own group, so a group kill leaves the
    Ray Train controller alive long enough to register one more checkpoint after the test has looked."""
    import psutil

    ours = []
    for candidate in psutil.process_iter():
        try:
            if candidate.pid != proc.pid and os.getsid(candidate.pid) == proc.pid:
                ours.append(candidate)
        except (ProcessLookupError, PermissionError):
            pass
    if proc.poll() is None:
        proc.send_signal(sig)
    for member in ours:
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=timeout)  # through Popen, which keeps its exit code

    def running(member) -> bool:  # a zombie has stopped writing; whoever adopted it reaps it, not us
        try:
            return member.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    deadline = time.monotonic() + timeout
    while alive := [m for m in ours if running(m)]:
        assert time.monotonic() < deadline, f"still running {timeout} s after signal {sig}: {alive}"
        time.sleep(0.1)


def tiny_overrides(**extra) -> list[str]:
    """The default preset shrunk to seconds: small data, few steps, its VQA and ChartQA tasks only (every other
    registered task dropped, so adding a task to the preset leaves these tests as they are). A task that ``extra``
    sizes is kept."""
    from evals.registry import TASKS

    base = {f"data.tasks.{kind}": "null" for kind in TASKS if kind not in ("vqa", "chartqa")
            and not any(key.startswith(f"data.tasks.{kind}.") for key in extra)}
    base |= {
        "data.tasks.vqa.train_size": 64, "data.tasks.vqa.test_size": 16, "data.tasks.chartqa.train_size": 64,
        "data.tasks.chartqa.test_size": 16, "sft.max_steps": 4, "sft.batch_size": 8, "sft.save_steps": 2,
        "sft.logging_steps": 1, "sft.warmup_steps": 0, "eval.batch_size": 16,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
