"""A result is what its code computed: code-aware stage keys, concurrent runs on one output dir, resume. Each test
drives `harness run` as a user does, in its own processes (each starts its own local Ray)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, loopback_only, tiny_overrides

SCORE = {"pipelines.score": "[data,model,eval]"}


@pytest.fixture(autouse=True)
def _in_namespace():
    if not loopback_only():
        pytest.fail("these tests start Ray: run them inside a loopback-only network namespace (scripts/test)")


def _harness(cwd: Path, *args: str, env: dict | None = None, wait: bool = True):
    env = {**(env or os.environ), "COLUMNS": "400"}  # rich wraps at 80 columns otherwise: one path, one line
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def _result(out_dir: Path, out: str) -> dict:
    run_dir = next(line.split("run directory:")[1].strip() for line in out.splitlines() if "run directory:" in line)
    return json.loads((out_dir / Path(run_dir).name / "result.json").read_text())


@pytest.mark.slow  # a real `harness` run (scripts/test --fast leaves it out)
def test_code_and_source_changes_recompute_what_depends_on_them(tmp_path):
    """In a copy of the project (Ray workers import the copy): a changed scoring rule in evals/metrics.py recomputes
    eval only; a file added under a local data source recomputes data and everything after it."""
    from datasets import Dataset, Image

    from stages.support.synthetic import generate

    project = tmp_path / "project"
    for part in ("harness", "stages", "evals", "configs"):
        shutil.copytree(ROOT / part, project / part, ignore=shutil.ignore_patterns("__pycache__"))
    charts = tmp_path / "charts"
    for split, n, seed in (("train", 64, 0), ("test", 16, 1)):
        (charts / split).mkdir(parents=True)
        rows = generate("bar-chartqa", n, seed, 64)
        Dataset.from_list(rows).cast_column("image", Image()).to_parquet(str(charts / split / "part-0.parquet"))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(project), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    args = ["run", "score", *tiny_overrides(**SCORE, **{"data.tasks.chartqa.source": str(charts)}),
            "--output-dir", "runs"]

    first = _result(work / "runs", _harness(work, *args, env=env))
    assert first["reused_stages"] == [] and first["metrics"]["eval/vqa_accuracy"] < 1.0
    assert next(s for s in first["stages"] if s["name"] == "eval")["code"]["files"]["evals/metrics.py"]

    metrics = project / "evals" / "metrics.py"  # a new scoring rule: every VQA answer counts as right
    metrics.write_text(metrics.read_text().replace('    if not human_answers:\n',
                                                   '    return 1.0\n    if not human_answers:\n', 1))
    second = _result(work / "runs", _harness(work, *args, env=env))
    assert second["reused_stages"] == ["data", "model"]
    assert second["metrics"]["eval/vqa_accuracy"] == 1.0  # scored by the workers, with the copy's code
    codes = [next(s for s in r["stages"] if s["name"] == "eval")["code"] for r in (first, second)]
    assert codes[0]["fingerprint"] != codes[1]["fingerprint"]

    (charts / "train" / "NOTES.txt").write_text("a file added to the source")
    third = _result(work / "runs", _harness(work, *args, env=env))
    assert third["reused_stages"] == []


@pytest.mark.slow  # a real `harness` run (scripts/test --fast leaves it out)
def test_concurrent_runs_and_a_forced_one_share_an_output_dir(tmp_path):
    """Two `harness run dpo` started together on one output dir and MLflow store, plus a third with --force: all
    finish with the same metrics (the forced one computed every stage itself, side by side with the first: a solo run
    of its own would only repeat that); one waits on the other's leases; --force deletes nobody's checkpoints."""
    from mlflow.tracking import MlflowClient

    from runtime.tracking import Tracker

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    Tracker(env["MLFLOW_TRACKING_URI"], "vlmlab")  # the store and experiment exist before three runs race for them
    args = ["run", "dpo", *tiny_overrides(**{"dpo.max_steps": 4, "dpo.save_steps": 2, "dpo.batch_size": 4,
                                             "dpo.warmup_steps": 0, "dpo.logging_steps": 1, "eval.limit": 8})]
    procs = [_harness(tmp_path, *args, *extra, "--output-dir", "shared", env=env, wait=False)
             for extra in ([], [], ["--force"])]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
        outs.append(out)
    results = [_result(tmp_path / "shared", out) for out in outs]
    assert results[2]["reused_stages"] == []  # --force: computed, not reused
    evals = {k: v for k, v in results[2]["metrics"].items()
             if k.startswith(("eval/", "dpo/train_loss", "sft/train_loss"))}
    assert evals["eval/mean_accuracy"] >= 0 and "dpo/train_loss" in evals
    for result in results[:2]:
        assert {k: result["metrics"][k] for k in evals} == evals
    assert any("waiting for the run computing the same stage" in out for out in outs[:2])
    ray_dirs = sorted(p.name for p in (tmp_path / "shared" / ".cache" / "ray").iterdir())
    for stage in ("sft", "dpo"):  # the shared storage and the forced run's own attempt, side by side
        mine = [d for d in ray_dirs if d.startswith(f"{stage}-")]
        assert len(mine) == 2 and any(len(d) == len(stage) + 17 for d in mine), ray_dirs
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("vlmlab").experiment_id], max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_no_intact_checkpoint_sets_the_storage_aside_and_restarts(tmp_path):
    """Every checkpoint Ray lists is gone: one warning, the storage is kept aside, the stage starts over."""
    from stages.support.launch import usable_checkpoints

    storage = tmp_path / "sft-0123456789abcdef"
    storage.mkdir()
    (storage / "checkpoint_manager_snapshot.json").write_text(json.dumps({
        "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a", "metrics": {}}],
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_a", "metrics": {}}}))
    said: list[str] = []
    usable_checkpoints(storage, said.append)
    assert not storage.exists() and len(list(tmp_path.glob("sft-0123456789abcdef.damaged-*"))) == 1
    assert len(said) == 1 and "checkpoint_a: missing" in said[0] and "starts over from step 0" in said[0]
    usable_checkpoints(storage, said.append)  # nothing left to repair: silent
    assert len(said) == 1
