"""Cost vs accuracy: the Pareto front, and `harness leaderboard` over real runs in a real MLflow store."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import tiny_overrides
from typer.testing import CliRunner

from harness.cli import app
from harness.config import DEFAULT_PRICES, load_config
from harness.leaderboard import pareto_front
from harness.pipeline import run_pipeline


def test_pareto_front_known_points():
    #            cost, acc
    points = [(1.0, 0.50),   # front: cheapest
              (2.0, 0.70),   # front
              (2.0, 0.60),   # dominated by (2.0, 0.70)
              (3.0, 0.70),   # dominated: costlier, not better
              (4.0, 0.90),   # front: best
              (5.0, 0.85)]   # dominated by (4.0, 0.90)
    assert pareto_front(points) == [True, True, False, False, True, False]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [True, True]  # ties dominate no one


def test_empty_store_is_friendly(workdir):
    out = CliRunner().invoke(app, ["leaderboard"])
    assert out.exit_code == 0 and "No finished vlmlab runs" in out.output


@pytest.fixture(scope="module")
def three_runs(ray_session, tmp_path_factory):
    """An MLflow store holding three finished sft runs that differ in one setting."""
    root = tmp_path_factory.mktemp("three_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        for tokens in (4, 6, 8):  # three settings; the cache shares data/model/sft between them
            run_pipeline(load_config(None, tiny_overrides(**{"eval.max_new_tokens": tokens})), "sft")
    return root


@pytest.fixture
def in_three_runs(three_runs, monkeypatch):
    monkeypatch.chdir(three_runs)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{three_runs / 'mlflow.db'}")
    return three_runs


def _json_rows(output: str) -> list[dict]:
    return json.loads(output[output.index("["): output.rindex("]") + 1])


def test_leaderboard_over_three_runs(in_three_runs):
    workdir = in_three_runs
    out = CliRunner().invoke(app, ["leaderboard", "--format", "json", "--plot", str(workdir / "lb.png")])
    assert out.exit_code == 0, out.output
    rows = _json_rows(out.output)
    assert len(rows) == 3
    for r in rows:
        assert r["usd"] == pytest.approx(r["accelerator_hours"] * DEFAULT_PRICES["CPU"], abs=1e-9)
        assert 0 < r["utilization"] <= 1
    assert any(r["pareto"] for r in rows)
    assert (workdir / "lb.png").stat().st_size > 5000
    md = CliRunner().invoke(app, ["leaderboard", "--format", "markdown", "--pipeline", "sft"])
    assert md.output.count("| ") > 3 and "accelerator_hours" in md.output
    table = CliRunner().invoke(app, ["leaderboard"])
    assert "viewStateShareKey=vlmlab-cost" in table.output
    none = CliRunner().invoke(app, ["leaderboard", "--pipeline", "dpo"])
    assert "No finished vlmlab runs" in none.output


def _chromium() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _browse(browser: str, url: str, *mode: str) -> subprocess.CompletedProcess:
    """Headless Chromium as STACK.md runs it; `mode` is --dump-dom or --screenshot=FILE."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--window-size=2400,1000", *mode, url],
            capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (scripts/test installs it where apt can)")
def test_mlflow_ui_shows_the_runs_with_cost_columns(in_three_runs):
    """MLflow's own UI, in a real headless browser: the runs table (our saved view) lists the three runs by name
    and shows the cost columns."""
    workdir = in_three_runs
    rows = _json_rows(CliRunner().invoke(app, ["leaderboard", "--format", "json"]).output)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not come up"
                time.sleep(1)
        url = f"{base}/#/experiments/{rows[0]['experiment_id']}/runs?viewStateShareKey=vlmlab-cost"
        browser = _chromium()
        shot = workdir / "mlflow_runs.png"
        _browse(browser, url, f"--screenshot={shot}")
        dom = _browse(browser, url, "--dump-dom").stdout
    finally:
        os.killpg(server.pid, 15)  # the server and its gunicorn/uvicorn workers: our own process group only
        server.wait(timeout=30)
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", "", dom,
                                                                           flags=re.S))))
    assert shot.stat().st_size > 20_000, "the screenshot is (nearly) blank"
    assert "vlmlab: cost vs accuracy" in text  # our saved view was applied
    for column in ("cost/usd", "cost/accelerator_hours", "cost/utilization", "eval/mean_accuracy"):
        assert column in text, column
    for r in rows:
        assert r["run"] in text, r["run"]
    usd = f"{rows[0]['usd']:.6g}"[:6]  # the UI prints the full float; its leading digits are in the table
    assert usd in text, (usd, text[:2000])
