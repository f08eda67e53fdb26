"""A real multi-node Ray cluster, as a lab runs one: a head with nothing schedulable (the usual GPU-less head)
and two worker nodes with one CPU each, their own raylets, one shared filesystem, token auth, a real `mlflow
server`. `ray job submit -- harness run dpo` must train DDP across both nodes and score and generate on them."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import ROOT, free_port, loopback_only, stop_session, tiny_overrides, wait_http
from mlflow.tracking import MlflowClient

BIN = Path(sys.executable).parent
NODES_SCRIPT = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.time() + float(sys.argv[2])
while True:
    alive = [{"id": n["NodeID"], "cpus": n["Resources"].get("CPU", 0)} for n in ray.nodes() if n["Alive"]]
    if len(alive) >= int(sys.argv[3]) or time.time() > deadline:
        break
    time.sleep(1)
print(json.dumps(alive))
"""


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs, 0 GPUs) + two 1-CPU worker nodes + an MLflow server, all on loopback."""
    if not loopback_only():
        pytest.fail("cluster tests must run inside a loopback-only network namespace: use scripts/test")
    tmp = Path(tempfile.mkdtemp(prefix="vc", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    token = tmp / "auth_token"  # Ray's token auth, with a token of this cluster's own (not ~/.ray's)
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, mlflow_port = free_port(), free_port(), free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        with open(tmp / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    def own_ports() -> list[str]:
        # every node its own agent and metrics ports: Ray's defaults (52365 for the agent's HTTP server, the one job
        # submission talks to) collide with any other Ray on the machine, such as a test on the other xdist worker.
        # Seen: the head's agent never registered and every `ray job submit` answered "No available agent" for 180 s
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    try:
        head = start("head", [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=0", "--num-gpus=0",
                              "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                              f"--temp-dir={tmp / 'ray'}", *own_ports(), *common])
        address = f"http://127.0.0.1:{dashboard}"
        # any answer (even a 401 for an unauthenticated call) means it is up
        wait_http(f"{address}/api/version", head, "the Ray head's dashboard", log=tmp / "head.log", any_status=True)
        for i in (1, 2):  # two raylets on one machine: each its own temp dir (sockets) and ports, else they
            # collide (seen: "The current node timed out during startup")
            start(f"worker{i}", [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
                                 "--num-gpus=0", f"--temp-dir={tmp / f'w{i}'}", *own_ports(), *common])
        server = start("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                                  f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts"),
                                  "--host", "127.0.0.1", "--port", str(mlflow_port)])
        # worker nodes took > 15 s to register on 2 busy cores: ask the GCS rather than sleep
        nodes = subprocess.run([sys.executable, "-c", NODES_SCRIPT, f"127.0.0.1:{gcs}", "240", "3"], env=env,
                               capture_output=True, text=True, timeout=400)
        alive = json.loads(nodes.stdout.strip().splitlines()[-1]) if nodes.returncode == 0 else []
        logs = "".join(f"\n--- {n}.log\n" + (tmp / f"{n}.log").read_text()[-1500:]
                       for n in ("head", "worker1", "worker2"))
        assert len(alive) == 3, nodes.stdout[-2000:] + nodes.stderr[-2000:] + logs
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", server, "mlflow server", 240, log=tmp / "mlflow.log",
                  any_status=True)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "env": env, "tmp": tmp,
               "tracking": f"http://127.0.0.1:{mlflow_port}",
               "head": {n["id"] for n in alive if n["cpus"] == 0}, "workers": {n["id"] for n in alive if n["cpus"]}}
    finally:
        for proc in procs:  # SIGKILL: `ray start --block` takes ~30 s to stop its node on SIGTERM
            stop_session(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _stage(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / name / "stage.json").read_text())


def test_dpo_job_trains_across_nodes_and_scores_on_the_workers(cluster):
    out = cluster["tmp"] / "runs"
    overrides = tiny_overrides(**{
        "resources.workers": 2, "resources.cpus_per_worker": 1, "dpo.max_steps": 4, "dpo.save_steps": 2,
        "dpo.batch_size": 4, "dpo.logging_steps": 1, "dpo.warmup_steps": 0, "dpo.preference.size": 32,
        "dpo.preference.rejected": "on_policy", "tracking.uri": cluster["tracking"]})
    deadline = time.monotonic() + 180
    while True:
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", f"--address={cluster['address']}", f"--working-dir={ROOT}", "--",
             "harness", "run", "dpo", f"--output-dir={out}", *overrides],
            env=cluster["env"], capture_output=True, text=True, timeout=1800)
        # the head's job agent registers some seconds after its dashboard answers (longer on a loaded machine); the
        # refused submission started nothing
        if "No available agent to submit job" not in submit.stdout + submit.stderr or time.monotonic() > deadline:
            break
        time.sleep(5)
    if submit.returncode != 0:
        agent_logs = [p.read_text(errors="replace")[-2000:]
                      for p in cluster["tmp"].glob("ray/session_*/logs/dashboard_agent.log")]
        pytest.fail(submit.stdout[-3000:] + submit.stderr[-2000:] + "\n--- the head's agent\n" + "".join(agent_logs))
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
    # the Jobs SDK, in a fresh process: an earlier ray.init() in this one caches ~/.ray's token, not this cluster's
    status = subprocess.run(
        [sys.executable, "-c", "import sys; from ray.job_submission import JobSubmissionClient as C; "
         "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)", cluster["address"], job_id],
        env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert status.stdout.strip() == "SUCCEEDED", status.stdout + status.stderr[-2000:]

    (result_path,) = out.glob("*/result.json")
    result, run_dir = json.loads(result_path.read_text()), result_path.parent
    # Ray's own lines go to the run's logs (runtime/output.py), and so does each worker's output, from every node
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.log"))
    assert "Connecting to existing Ray cluster" in logs  # attached, no Ray of its own
    assert "(RayTrainWorker pid=" not in submit.stdout  # no worker output forwarded to the job's log
    assert {p.name for p in (run_dir / "logs" / "ray").glob("*.log")} >= {"sft.rank0.log", "sft.rank1.log",
                                                                         "dpo.rank1.log", "eval.shard0.log"}
    assert result["metrics"]["sft/steps"] == 4 and result["metrics"]["dpo/steps"] == 4
    workers, head = cluster["workers"], cluster["head"]
    for name in ("sft", "dpo"):  # DDP: one rank on each worker node, none on the head
        assert set(_stage(run_dir, name)["ran_on"]["rank_nodes"]) == workers, name
        assert not (run_dir / name / "trainer").exists()  # each rank's scratch went with the stage
    generated = _stage(run_dir, "dpo")["outputs"]["generation_shards"]
    assert len(generated) == 2 and sum(s["items"] for s in generated) == 32
    shards = _stage(run_dir, "eval")["outputs"]["shards"]
    assert {s["checkpoint"] for s in shards} == {"base", "sft", "dpo"} and len(shards) == 6
    for shard in generated + shards:  # the GPU-less head never loads a model
        assert shard["node_id"] in workers and shard["node_id"] not in head, shard
    assert sum(s["items"] for s in shards if s["checkpoint"] == "dpo") == 32  # 16 per task, each scored once
    assert result["manifest"]["hardware"]["cpu_count"] and "driver_hardware" in result["manifest"]

    client = MlflowClient(tracking_uri=cluster["tracking"])
    runs = client.search_runs([client.get_experiment_by_name("vlmlab").experiment_id])
    parents = [r for r in runs if r.data.tags.get("vlmlab.pipeline") == "dpo"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parents[0].data.metrics["cost/usd"] > 0
    dpo_run = next(r for r in runs if r.data.tags.get("vlmlab.stage") == "dpo")
    assert len(client.get_metric_history(dpo_run.info.run_id, "dpo/loss")) == 4  # rank 0's steps, each once


def test_eval_scores_the_base_model_on_the_free_node_while_sft_trains(cluster, tmp_path):
    """One training rank on one worker node, the other node free: with eval.while_training=on the base model is
    scored there while sft trains, and every score equals that of off (forced: a plain rerun would reuse every stage,
    as while_training is not in the stage key)."""
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"]}
    overrides = tiny_overrides(**{"resources.workers": 1, "resources.cpus_per_worker": 1,
                                  "tracking.uri": cluster["tracking"]})

    def run(*extra: str) -> tuple[dict, Path, str]:
        proc = subprocess.run([str(BIN / "harness"), "run", "sft", f"--output-dir={tmp_path / 'runs'}", *overrides,
                               *extra], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        path = max((tmp_path / "runs").glob("*/result.json"), key=lambda p: p.stat().st_mtime)
        return json.loads(path.read_text()), path.parent, " ".join(proc.stdout.split())

    on, run_dir, said = run("eval.while_training=on")
    off, _, _ = run("eval.while_training=off", "--force")
    scores = {k: v for k, v in off["metrics"].items() if k.startswith("eval/")}
    assert "eval/base_mean_accuracy" in scores and {k: on["metrics"][k] for k in scores} == scores

    def predictions(run: Path) -> dict[str, str]:  # every answer: the scores are 0 here, the base model's answers vary
        return {p.name: p.read_text() for p in sorted((run / "eval").glob("predictions_*.jsonl"))}

    assert len(predictions(run_dir)) == 4 and predictions(run_dir) == predictions(run_dir.parent / off["run_id"])
    assert "eval: scoring base on 1 spare worker(s) while sft trains" in said, said
    evaluation, sft = _stage(run_dir, "eval"), _stage(run_dir, "sft")
    (early,) = evaluation["outputs"]["while_training"]
    assert early["checkpoint"] == "base" and early["during"] == "sft" and 0 < early["ended_s"]
    assert early["training_ended_s"] > 0
    base_nodes = {s["node_id"] for s in evaluation["outputs"]["shards"] if s["checkpoint"] == "base"}
    assert base_nodes and base_nodes.isdisjoint(sft["ran_on"]["rank_nodes"])  # the other node
    assert (run_dir / "logs" / "ray" / "eval-base.shard0.log").exists()
    # its device time is the eval stage's: every held second in one phase
    assert sum(evaluation["held"].values()) == pytest.approx(evaluation["accelerator_hours"] * 3600, rel=1e-3)
    assert evaluation["held"]["generation"] > 0
    assert _stage(run_dir.parent / off["run_id"], "eval")["outputs"]["while_training"] == []


def test_more_workers_than_the_cluster_holds_fail_with_what_it_has(cluster, tmp_path):
    """4 one-CPU workers on a cluster with room for 2: waits placement_timeout_s, then one clear error, exit 2,
    before any stage ran."""
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"]}
    proc = subprocess.run(
        [str(BIN / "harness"), "run", "sft", f"--output-dir={tmp_path / 'runs'}",
         *tiny_overrides(**{"resources.workers": 4, "resources.cpus_per_worker": 1,
                            "resources.placement_timeout_s": 3, "tracking.uri": cluster["tracking"]})],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stderr.splitlines() if "error:" in ln)
    assert "needs 4 worker(s) of {CPU: 1}" in line and "room for 2" in line and "3 node(s)" in line, line
    assert not (tmp_path / "runs").exists()  # the pre-flight check: no stage work, no run directory
    client = MlflowClient(tracking_uri=cluster["tracking"])
    experiment = client.get_experiment_by_name("vlmlab")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    assert not [r for r in runs if r.info.status == "RUNNING"]
