"""A real multi-node Ray cluster, as a lab runs one: a head with nothing schedulable (the usual GPU-less head)
and two worker nodes with one CPU each, their own raylets, one shared filesystem, token auth, a real `mlflow
server`. `ray job submit -- harness run dpo` must train DDP across both nodes and score and generate on them."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, local_cluster, loopback_only, tiny_overrides
from mlflow.tracking import MlflowClient

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs, 0 GPUs) + two 1-CPU worker nodes + an MLflow server, all on loopback."""
    if not loopback_only():
        pytest.fail("cluster tests must run inside a loopback-only network namespace: use scripts/test")
    with local_cluster() as started:
        yield started


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
    scored there while sft trains, and its scores equal those of off. With eval.checkpoints=all the checkpoint sft
    saves at step 2 of 4 is scored there too, with the answers off's sft gives: it stops at step 2 (a constant
    learning rate: the same first two steps). (The sft model is scored after training either way.)"""
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"]}
    overrides = tiny_overrides(**{"resources.workers": 1, "resources.cpus_per_worker": 1,
                                  "sft.lr_scheduler": "constant", "tracking.uri": cluster["tracking"]})

    def run(*extra: str) -> tuple[dict, Path, str]:
        proc = subprocess.run([str(BIN / "harness"), "run", "sft", f"--output-dir={tmp_path / 'runs'}", *overrides,
                               *extra], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        path = max((tmp_path / "runs").glob("*/result.json"), key=lambda p: p.stat().st_mtime)
        return json.loads(path.read_text()), path.parent, " ".join(proc.stdout.split())

    on, run_dir, said = run("eval.while_training=on", "eval.checkpoints=all")
    off, off_dir, _ = run("eval.while_training=off", "sft.max_steps=2", "--force")  # --force: no answer reused
    assert off["metrics"]["sft/steps"] == 2
    scores = {k: v for k, v in off["metrics"].items() if k.startswith(("eval/base_", "eval/prior_"))}
    assert "eval/base_mean_accuracy" in scores and {k: on["metrics"][k] for k in scores} == scores

    def predictions(run: Path, label: str, named: str | None = None) -> dict[str, str]:  # every answer: the scores
        # are 0 here, the answers vary. ``named``: as if the checkpoint were labelled so
        return {p.name.replace(f"_{label}_", f"_{named or label}_"): p.read_text()
                for p in sorted((run / "eval").glob(f"predictions_{label}_*.jsonl"))}

    assert len(predictions(run_dir, "base")) == 2 and predictions(run_dir, "base") == predictions(off_dir, "base")
    assert "eval: scoring base on 1 spare worker(s) while sft trains" in said, said
    evaluation, sft = _stage(run_dir, "eval"), _stage(run_dir, "sft")
    early, step2 = evaluation["outputs"]["while_training"]
    assert early["checkpoint"] == "base" and early["during"] == "sft" and 0 < early["ended_s"]
    assert early["training_ended_s"] > 0
    base_nodes = {s["node_id"] for s in evaluation["outputs"]["shards"] if s["checkpoint"] == "base"}
    assert base_nodes and base_nodes.isdisjoint(sft["ran_on"]["rank_nodes"])  # the other node
    assert (run_dir / "logs" / "ray" / "eval-base.shard0.log").exists()
    # its device time is the eval stage's: every held second in one phase
    assert sum(evaluation["held"].values()) == pytest.approx(evaluation["accelerator_hours"] * 3600, rel=1e-3)
    assert evaluation["held"]["generation"] > 0
    assert _stage(off_dir, "eval")["outputs"]["while_training"] == []

    # eval.checkpoints=all: step 2's checkpoint, scored on the free node, billed to sft, a curve in MLflow
    assert step2["checkpoint"] == "sft-step2" and step2["during"] == "sft" and 0 < step2["began_s"] < step2["ended_s"]
    (scored,) = sft["outputs"]["checkpoint_scores"]
    record = json.loads(Path(scored["file"]).read_text())
    assert {s["node_id"] for s in record["shards"]}.isdisjoint(sft["ran_on"]["rank_nodes"])
    assert sft["held"]["generation"] > 0
    assert sum(sft["held"].values()) == pytest.approx(sft["accelerator_hours"] * 3600, rel=1e-3)
    (curve,) = evaluation["outputs"]["checkpoints"]
    assert curve["step"] == 2 and "mean_accuracy_ci_high" in curve["metrics"]
    client = MlflowClient(tracking_uri=cluster["tracking"])
    history = client.get_metric_history(evaluation_run(client, on["mlflow_run_id"]),
                                        "eval/checkpoints/sft/mean_accuracy")
    assert [m.step for m in history] == [2]
    assert len(predictions(run_dir, "sft-step2")) == 2
    assert predictions(run_dir, "sft-step2", "sft") == predictions(off_dir, "sft")


def evaluation_run(client, parent: str) -> str:
    """The MLflow run id of the eval stage of the pipeline run ``parent``."""
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent}' and tags.`vlmlab.stage` = 'eval'")
    return runs[0].info.run_id


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
