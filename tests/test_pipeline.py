"""`harness run sft` end to end on the real stack: local Ray (loopback namespace), SQLite MLflow, TRL, lm-eval."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import tiny_overrides
from mlflow.tracking import MlflowClient

from harness.pipeline import run_pipeline
from runtime.config import load_config
from runtime.errors import DataError


def _runs(workdir):
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vlmlab")
    return client, client.search_runs([exp.experiment_id]) if exp else []


def test_sft_pipeline_end_to_end(ray_session, workdir):
    cfg = load_config(None, tiny_overrides())
    result = run_pipeline(cfg, "sft")
    run_dir = workdir / "runs" / result["run_id"]

    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk["pipeline"] == "sft" and on_disk["config"]["sft"]["max_steps"] == 4
    assert [s["name"] for s in on_disk["stages"]] == ["data", "model", "sft", "eval"]
    for stage in on_disk["stages"]:
        assert {"name", "metrics", "wall_seconds", "accelerator_hours", "cost_usd"} <= set(stage)
    metrics = on_disk["metrics"]
    for key in ("eval/vqa_accuracy", "eval/chartqa_relaxed_accuracy", "eval/base_vqa_accuracy",
                "eval/base_chartqa_relaxed_accuracy", "eval/prior_vqa_accuracy",
                "eval/prior_chartqa_relaxed_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert any(k.startswith("eval/vqa_accuracy/") for k in metrics)  # per question type
    assert metrics["sft/steps"] == 4
    sft = next(s for s in on_disk["stages"] if s["name"] == "sft")
    assert sft["accelerator_hours"] > 0 and sft["cost_usd"] > 0
    assert sft["cost"]["cost/utilization"] > 0
    # every held device-second is in one phase: start, steps, generation, scoring, saving or idle (runtime.cost)
    for stage in [s for s in on_disk["stages"] if s["accelerator_hours"]]:
        held = stage["held"]
        assert set(held) == {"start", "steps", "generation", "scoring", "saving", "idle"}, stage["name"]
        assert sum(held.values()) == pytest.approx(stage["accelerator_hours"] * 3600, rel=1e-3, abs=1e-2)
        assert held["start"] > 0, stage["name"]  # placement, process start, imports, model load: never free
        busy = held["steps"] + held["generation"] + held["scoring"]
        assert busy / sum(held.values()) == pytest.approx(stage["cost"]["cost/utilization"], abs=1e-3)
    by_name = {s["name"]: s["held"] for s in on_disk["stages"] if "held" in s}
    assert by_name["sft"]["steps"] > 0 and by_name["sft"]["saving"] > 0 and by_name["sft"]["generation"] == 0
    assert by_name["eval"]["generation"] > 0 and by_name["eval"]["steps"] == 0
    assert on_disk["cost_usd"] == pytest.approx(sum(s["cost_usd"] for s in on_disk["stages"]))
    manifest = on_disk["manifest"]
    assert manifest["seed"] == 0 and manifest["packages"]["trl"] == "1.16.0"
    assert len(manifest["config_sha256"]) == 64 and set(manifest["data_fingerprints"]) == {"vqa", "chartqa"}
    assert (run_dir / "config.yaml").exists() and (run_dir / "sft" / "model" / "config.json").exists()

    client, runs = _runs(workdir)
    parent = next(r for r in runs if r.info.run_id == on_disk["mlflow_run_id"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.tags["vlmlab.stage"] for r in children) == ["data", "eval", "model", "sft"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert parent.data.metrics["cost/usd"] > 0
    assert parent.data.metrics["eval/vqa_accuracy"] == metrics["eval/vqa_accuracy"]
    assert parent.data.params["sft.max_steps"] == "4"
    sft_run = next(r for r in children if r.data.tags["vlmlab.stage"] == "sft")
    losses = client.get_metric_history(sft_run.info.run_id, "sft/loss")
    assert len(losses) >= 2  # step metrics streamed from the Ray worker
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"config.yaml", "result.json"}

    # Local Ray without the dashboard: Ray Train's State API poller (one failed query and warning a second) is off,
    # and no Ray Data manager is started for a job that passes no datasets
    import ray

    classes = {a["ActorClassName"] for a in ray._private.state.actors().values()}
    assert "TrainController" in classes and not classes & {"PlacementGroupCleaner", "DatasetManager"}

    # and its processes give each of their ~40 threads a malloc arena (else the training thread queues on a lock)
    @ray.remote
    def arena_limit():
        return os.environ.get("MALLOC_ARENA_MAX")

    assert int(ray.get(arena_limit.remote())) >= 64


def test_eval_while_training_on_stops_where_there_is_no_room(ray_session):
    """eval.while_training=on where the training ranks take every CPU of the local Ray: one clear error, nothing
    started. (Scoring beside training, and its scores: test_cluster.)"""
    from runtime.errors import UserError
    from stages import StageOutput
    from stages.eval import score_while_training

    cfg = load_config(None, tiny_overrides(**{"eval.while_training": "on",  # one rank takes the local Ray's CPUs
                                              "resources.cpus_per_worker": os.cpu_count()}))
    made = {"model": StageOutput(metrics={}, outputs={"model_dir": "/nonexistent/base"})}
    with pytest.raises(UserError, match=r"while_training=on: while sft trains on 1 worker\(s\), the cluster has room "
                                        r"for 0 more.*eval.while_training=auto"):
        score_while_training(cfg, made, "sft", None, set())
    assert score_while_training(cfg.model_copy(update={"eval": cfg.eval.model_copy(
        update={"while_training": "auto"})}), made, "sft", None, set()) == []


def test_bad_data_fails_cleanly(ray_session, workdir):
    """A dataset missing its question column: clear error, no result.json, no MLflow run left RUNNING."""
    from datasets import Dataset, Image

    from stages.support.synthetic import generate

    bad = workdir / "bad_charts"
    bad.mkdir()
    rows = [{k: v for k, v in r.items() if k != "query"} for r in generate("bar-chartqa", 8, 0, 64)]
    for split in ("train", "test"):
        Dataset.from_list(rows).cast_column("image", Image()).to_parquet(str(bad / f"{split}.parquet"))
    cfg = load_config(None, tiny_overrides(**{"data.tasks.chartqa.source": str(bad)}))
    with pytest.raises(DataError, match=r"task 'chartqa' needs column 'query'"):
        run_pipeline(cfg, "sft")
    assert not list((workdir / "runs").glob("*/result.json"))
    _, runs = _runs(workdir)
    assert all(r.info.status == "FAILED" for r in runs)  # none at all when the data is checked before any run


def _last_result(workdir):
    results = sorted((workdir / "runs").glob("*/result.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(results[-1].read_text())


# enough training for non-zero accuracies, so the determinism check compares real numbers
LEARNS = {"sft.max_steps": 60, "sft.batch_size": 16, "sft.learning_rate": 3e-3, "sft.save_steps": 30}


@pytest.fixture(scope="module")
def first_run(ray_session, tmp_path_factory):
    """One finished tiny `sft` run shared by the cache/reproduce tests of this module."""
    root = tmp_path_factory.mktemp("repro")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    result = run_pipeline(load_config(None, tiny_overrides(**LEARNS)), "sft")
    yield root, result
    mp.undo()


def test_rerun_reuses_every_stage(ray_session, first_run):
    root, first = first_run
    again = run_pipeline(load_config(None, tiny_overrides(**LEARNS)), "sft")
    assert again["reused_stages"] == ["data", "model", "sft", "eval"]
    assert again["metrics"] == first["metrics"]
    assert again["cost_usd"] == pytest.approx(first["cost_usd"]) and again["cost_usd_this_run"] == 0
    assert again["wall_seconds"] < 0.1 * first["wall_seconds"]


def test_changed_key_reruns_only_downstream(ray_session, first_run):
    result = run_pipeline(load_config(None, tiny_overrides(**LEARNS, **{"eval.max_new_tokens": 6})), "sft")
    assert result["reused_stages"] == ["data", "model", "sft"]


def test_damaged_cache_entry_is_recomputed(ray_session, first_run, capsys):
    from rich.console import Console

    root, first = first_run
    data_file = next(iter(first["manifest"]["data_fingerprints"]))  # "vqa" or "chartqa"
    stage = next(s for s in first["stages"] if s["name"] == "data")
    parquet = root / "runs" / first["run_id"] / "data" / data_file / "train.parquet"
    parquet.write_bytes(parquet.read_bytes()[:-10])  # truncate: the hash no longer matches
    result = run_pipeline(load_config(None, tiny_overrides(**LEARNS)), "sft", console=Console(force_terminal=False))
    out = capsys.readouterr().out
    assert "entry for stage 'data' is damaged (hash mismatch" in out
    assert "data" not in result["reused_stages"] and "sft" in result["reused_stages"]
    assert result["manifest"]["data_fingerprints"] == first["manifest"]["data_fingerprints"]  # regenerated
    assert stage["metrics"] == next(s for s in result["stages"] if s["name"] == "data")["metrics"]


def test_deterministic_and_reproduce(ray_session, first_run):
    """Same config and seed, recomputed from scratch: identical metrics; `harness reproduce` agrees."""
    from typer.testing import CliRunner

    from harness.cli import app

    root, first = first_run
    run_dir = root / "runs" / first["run_id"]
    ok = CliRunner().invoke(app, ["reproduce", str(run_dir)])
    assert ok.exit_code == 0, ok.output
    assert "reproduced" in ok.output
    assert "tolerance 0: exact: the same CPU as recorded" in " ".join(ok.output.split())  # nothing allowed here
    rerun = _last_result(root)
    assert rerun["reused_stages"] == []
    assert first["metrics"]["eval/mean_accuracy"] > 0  # a real number to reproduce, not a trivial 0
    for key in ("eval/vqa_accuracy", "eval/chartqa_relaxed_accuracy", "sft/train_loss"):
        assert rerun["metrics"][key] == first["metrics"][key], key
    assert rerun["manifest"]["data_fingerprints"] == first["manifest"]["data_fingerprints"]

    # a recorded metric the rerun does not give is the one reported (the command's exit 1 on it: compare_metrics'
    # verdict; a second rerun to see it would cost a minute of this suite)
    from harness.reproduce import compare_metrics

    edited = first["metrics"] | {"eval/vqa_accuracy": first["metrics"]["eval/vqa_accuracy"] + 0.5}
    rows = compare_metrics(edited, rerun["metrics"], 0.0)
    assert [r["metric"] for r in rows if not r["ok"]] == ["eval/vqa_accuracy"] and len(rows) > 10


def _score_sft_model(first_run, workers: int, force: bool = False, **overrides) -> tuple[dict, dict]:
    """Only data -> model -> eval, on the first run's SFT checkpoint, with ``workers`` one-CPU eval shards."""
    root, first = first_run
    model_dir = root / "runs" / first["run_id"] / "sft" / "model"
    cfg = load_config(None, tiny_overrides(**{"model.source": str(model_dir), "pipelines.score": "[data,model,eval]",
                                              "resources.workers": workers, "resources.cpus_per_worker": 1,
                                              **overrides}))
    result = run_pipeline(cfg, "score", force=force)
    stage = next(s for s in result["stages"] if s["name"] == "eval")
    eval_dir = Path(stage.get("reused_from") or root / "runs" / result["run_id"] / "eval")
    predictions = {p.name: p.read_text() for p in sorted(eval_dir.glob("predictions_*.jsonl"))}
    return result, predictions


def test_sharded_eval_scores_exactly_like_one_shard(ray_session, first_run):
    """Two eval shards (two Ray tasks) give every item the prediction one shard gives it, so the same metrics. (The
    two-shard run is forced: it would otherwise read every answer from the one-shard run's item cache.)"""
    one, one_predictions = _score_sft_model(first_run, workers=1)
    two, two_predictions = _score_sft_model(first_run, workers=2, force=True)
    evals = {k: v for k, v in one["metrics"].items() if k.startswith("eval/")}
    assert evals["eval/mean_accuracy"] > 0 and len(one_predictions) == 2
    assert {k: v for k, v in two["metrics"].items() if k.startswith("eval/")} == evals
    assert two_predictions == one_predictions
    shards = next(s for s in two["stages"] if s["name"] == "eval")["outputs"]["shards"]
    assert [s["shard"] for s in shards] == [0, 1] and sum(s["generated"] for s in shards) == 32
    assert all(s["items"] == s["generated"] > 0 for s in shards)


def test_harness_eval_reproduces_a_runs_scores(ray_session, first_run):
    """`harness eval <a run's SFT checkpoint>` (that run's data and eval settings) gives exactly its eval metrics,
    as a recorded run of its own, generating no answer (the run's are in the item cache); a task the registry lacks
    is one line, exit 2, before any work."""
    from typer.testing import CliRunner

    from harness.cli import app

    root, first = first_run
    model_dir = root / "runs" / first["run_id"] / "sft" / "model"
    ok = CliRunner().invoke(app, ["eval", str(model_dir)], env={"COLUMNS": "200"})
    assert ok.exit_code == 0, ok.output
    said = f"data and eval settings from {root / 'runs' / first['run_id'] / 'config.yaml'}"
    assert "".join(said.split()) in "".join(ok.output.split())  # rich folds a long path onto the next line
    scored = _last_result(root)
    assert scored["pipeline"] == "eval" and [s["name"] for s in scored["stages"]] == ["data", "model", "eval"]
    final = {k: v for k, v in first["metrics"].items() if k.startswith("eval/") and not k.startswith(
        ("eval/base_", "eval/prior_"))}
    assert final and {k: scored["metrics"][k] for k in final} == final
    assert scored["stages"][-1]["outputs"]["answers"] == {"generated": 0, "cached": 32}
    assert "32 of 32 answers read from the item cache" in " ".join(ok.output.split())
    assert scored["manifest"]["model_source"] == str(model_dir) and scored["cost_usd"] > 0

    runs_before = len(list((root / "runs").iterdir()))
    bad = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", "vqa,textvqa2"])
    assert bad.exit_code == 2 and "--tasks: unknown task 'textvqa2' (known: " in bad.output
    assert len(list((root / "runs").iterdir())) == runs_before


def test_worker_killed_while_scoring_a_shard_is_retried(ray_session, first_run):
    """SIGKILL the Ray worker of an eval shard once it has answered a batch: Ray retries the shard, which generates
    only what the item cache lacks, and every prediction and score is an uninterrupted eval's. (Both evals forced: a
    plain one would read the other's answers.)"""
    import threading
    import time

    import psutil

    answers = first_run[0] / "runs" / ".cache" / "eval-items"
    earlier = set(answers.glob("*.jsonl"))
    killed: list[int] = []
    stop = threading.Event()

    def kill_the_shard_after_a_batch():
        while not stop.is_set() and not killed:
            if any(p not in earlier and p.stat().st_size for p in answers.glob("*.jsonl")):
                for proc in psutil.Process().children(recursive=True):
                    try:
                        if "eval-shard" in " ".join(proc.cmdline()):
                            proc.kill()
                            killed.append(proc.pid)
                            return
                    except psutil.Error:
                        continue
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_the_shard_after_a_batch, daemon=True)
    watcher.start()
    try:  # one item a batch and one shard: 32 batches, so the kill lands with most of them still to answer
        retried, predictions = _score_sft_model(first_run, workers=1, force=True, **{"eval.batch_size": 1})
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert killed, "no eval shard worker was seen to kill"
    answered = next(s for s in retried["stages"] if s["name"] == "eval")["outputs"]["answers"]
    assert 0 < answered["cached"] < 32 and answered["generated"] == 32 - answered["cached"], answered
    clean, clean_predictions = _score_sft_model(first_run, workers=1, force=True, **{"eval.batch_size": 1})
    assert next(s for s in clean["stages"] if s["name"] == "eval")["outputs"]["answers"]["generated"] == 32
    assert {k: v for k, v in retried["metrics"].items() if k.startswith("eval/")} == \
        {k: v for k, v in clean["metrics"].items() if k.startswith("eval/")}
    assert predictions == clean_predictions


def test_gc_keeps_the_last_runs_and_what_they_reuse(ray_session, first_run):
    """`harness gc --keep 1`: a dry run first, then --apply; the newest run stays and its cached stages still load;
    of the eval's item cache only the answers the kept run scored with stay."""
    from typer.testing import CliRunner

    from evals.item_cache import parse_name
    from harness.cli import app

    root, _ = first_run
    newest = run_pipeline(load_config(None, tiny_overrides()), "sft", force=True)  # 4 steps; reuses nothing
    runs = root / "runs"
    before = {p.parent.name for p in runs.glob("*/config.yaml")}
    answers = runs / ".cache" / "eval-items"
    keys = {parse_name(p.name)[0] for p in answers.glob("*.jsonl")}
    dry = CliRunner().invoke(app, ["gc", "--keep", "1", "--output-dir", str(runs)])
    assert dry.exit_code == 0 and "would free" in dry.output and "--apply" in dry.output, dry.output
    assert {p.parent.name for p in runs.glob("*/config.yaml")} == before  # a dry run deletes nothing
    done = CliRunner().invoke(app, ["gc", "--keep", "1", "--output-dir", str(runs), "--apply"])
    assert done.exit_code == 0, done.output
    left = {p.parent.name for p in runs.glob("*/config.yaml")}
    assert newest["run_id"] in left and left < before
    for run in left:  # what a kept run names (e.g. a model.source inside another run) is kept with it
        config = (runs / run / "config.yaml").read_text()
        assert all(name in left for name in before if f"{runs}/{name}/" in config)
    assert not list((runs / ".cache" / "ray").glob("sft-*"))  # finished stages need no checkpoints
    def used(run: str) -> set[str]:  # the item cache keys a run's eval scored with
        result = json.loads((runs / run / "result.json").read_text()) if (runs / run / "result.json").exists() else {}
        return {key for s in result.get("stages", []) if s["name"] == "eval"
                for key in s.get("outputs", {}).get("item_cache_keys", [])}

    # --keep 1 keeps the newest run of each pipeline and what they name; all of them finished, so exactly the
    # answers their evals scored with stay
    assert all((runs / run / "result.json").exists() for run in left)
    kept_keys = set().union(*(used(run) for run in left))
    assert used(newest["run_id"]) and {parse_name(p.name)[0] for p in answers.glob("*.jsonl")} == kept_keys <= keys
    again = run_pipeline(load_config(None, tiny_overrides()), "sft")  # the kept run's stages, all reused
    assert again["reused_stages"] == ["data", "model", "sft", "eval"]
