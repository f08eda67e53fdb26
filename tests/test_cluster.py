"""A real Ray cluster, as a lab would use one: `ray start --head`, then `ray job submit -- harness run sft`
(the default preset: ~6 minutes on 2 cores)."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, loopback_only
from mlflow.tracking import MlflowClient

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A single-node Ray cluster on loopback; stopped afterwards by the PIDs it started (never `ray stop`)."""
    if not loopback_only():
        pytest.fail("cluster tests must run inside a loopback-only network namespace: use scripts/test")
    tmp = Path(tempfile.mkdtemp(prefix="vc", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    dashboard = _free_port()
    token = tmp / "auth_token"  # Ray's token auth, with a token of this cluster's own (not ~/.ray's)
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    with open(tmp / "head.log", "w") as log:  # the child keeps its own copy of the descriptor
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={_free_port()}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
             f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # answering (even 401 for an unauthenticated call) means it is up
                break
            except OSError:
                assert head.poll() is None, (tmp / "head.log").read_text()[-3000:]
                assert time.time() < deadline, "the Ray head's dashboard did not come up"
                time.sleep(1)
        yield address, env, tmp
    finally:
        started = psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        for proc in started:  # the head's raylet, GCS, dashboard and workers: ours, by PID
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def test_ray_job_submit_runs_a_pipeline_on_the_cluster(ray_head):
    address, env, tmp = ray_head
    out, db = tmp / "runs", tmp / "mlflow.db"
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", f"--address={address}", f"--working-dir={ROOT}", "--",
         "harness", "run", "sft", f"--output-dir={out}", f"tracking.uri=sqlite:///{db}"],  # the default preset
        env=env, capture_output=True, text=True, timeout=1800)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
    # the Jobs SDK, in a fresh process: an earlier ray.init() in this one caches ~/.ray's token, not this cluster's
    status = subprocess.run(
        [sys.executable, "-c", "import sys; from ray.job_submission import JobSubmissionClient as C; "
         "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)", address, job_id],
        env=env, capture_output=True, text=True, timeout=120)
    assert status.stdout.strip() == "SUCCEEDED", status.stdout + status.stderr[-2000:]
    # the job attached to this cluster rather than starting a Ray of its own
    assert "Connecting to existing Ray cluster" in submit.stdout + submit.stderr
    results = list(out.glob("*/result.json"))
    assert len(results) == 1
    result = json.loads(results[0].read_text())
    metrics = result["metrics"]
    assert metrics["sft/steps"] == 1000
    # the cluster's one 2-CPU worker computes what a local run computes: the recorded default-preset result
    reference = json.loads((ROOT / "results" / "reference" / "sft.json").read_text())["metrics"]
    for key in ("sft/loss_end", "eval/vqa_accuracy", "eval/chartqa_relaxed_accuracy"):
        assert abs(metrics[key] - reference[key]) <= 0.01, (key, metrics[key], reference[key])
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("vlmlab").experiment_id],
                              filter_string="tags.`vlmlab.pipeline` = 'sft'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["cost/usd"] > 0
