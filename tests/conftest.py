"""Shared fixtures (the plain helpers are in helpers.py). Ray starts once per test module that needs it (it costs
~30 s on 2 cores); one real `mlflow server` serves the whole session's tests that need a plain one."""
from __future__ import annotations

import os
import signal

import pytest

pytest.register_assert_rewrite("helpers")  # its checks fail with pytest's explanations, as in a test module

from helpers import FAST_ENV, loopback_only, start_mlflow_server, stop_session  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `scripts/test --fast`, the inner loop: every test that needs no Ray, no Docker, no server and no training run. A test
# is left out when it asks (through any fixture) for one of these, or is marked `slow` (it starts one itself).
SLOW_FIXTURES = frozenset({"ray_session", "cluster", "docker_env", "image", "mlflow_server", "s3", "backbones",
                           "estimated", "tiny", "hub_copies", "hub_copy", "loaded_tasks"})


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true",
                     help="only the tests that start no Ray, Docker, server or training run (the inner loop)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts Ray, Docker, a server or a training run itself (not in --fast)")
    if config.getoption("--fast"):
        os.environ[FAST_ENV] = "1"  # property tests draw a quarter of their examples (helpers.property_settings)


# Files by their seconds in a serial fresh-clone run (2026-12-07, 2 cores), the longest first. scripts/test runs the
# suite on two xdist workers that take whole files, in collection order: starting the long files first keeps one
# worker from running a long file alone at the end. Files not named here follow, in their usual order.
LONGEST_FIRST = ("test_docker.py",  # 1188 s
                 "test_kill.py", "test_real_shapes.py", "test_sweep.py", "test_pipeline.py", "test_trust.py",  # 280-350
                 "test_faults.py", "test_preference.py", "test_cluster.py", "test_leaderboard.py",  # 130-180
                 "test_object_storage.py", "test_fit.py", "test_align.py", "test_liveness.py", "test_secrets.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its own order
    if not config.getoption("--fast"):
        return
    slow = [item for item in items
            if item.get_closest_marker("slow") or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if slow:
        config.hook.pytest_deselected(items=slow)
        chosen = set(map(id, slow))
        items[:] = [item for item in items if id(item) not in chosen]


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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` on 127.0.0.1 for the session (it takes 20-60 s to start here), with its own SQLite
    store (``.db``) and artifact directory under ``.root``; ``.uri`` and ``.port`` reach it. Shared: each test
    writes to an experiment of its own name and never stops the server (a test that must stop or kill one starts
    its own with helpers.start_mlflow_server). Stopped with SIGTERM, its workers too, after the last test."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    stop_session(server.proc, signal.SIGTERM)
