"""Faults injected for real: killed workers and processes, signals, unreachable tracking, bad checkpoints,
concurrent writers. Each asserts that nothing is lost and nothing is left RUNNING."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import SLOW_SFT, free_port, registered_checkpoint, tiny_overrides, wait_for

from harness.pipeline import run_pipeline
from runtime.config import load_config
from runtime.errors import UserError


def test_worker_killed_mid_stage_restarts_from_checkpoint(ray_session, workdir):
    """A Ray Train worker SIGKILLed mid-stage: with failure.max_failures=1 the stage resumes from its last
    checkpoint and ends with the same eval metrics as an uninterrupted run (deterministic on CPU)."""
    import psutil

    overrides = tiny_overrides(**(SLOW_SFT | {"sft.max_steps": 80}))  # room to kill it after a checkpoint
    clean = run_pipeline(load_config(None, overrides), "sft", str(workdir / "clean"))
    killed = []

    def kill_worker_after_first_checkpoint():
        # a checkpoint directory appears before Ray's controller registers it (a kill then restarts from
        # nothing): wait until Ray's own checkpoint-manager snapshot lists a checkpoint
        wait_for(lambda: registered_checkpoint(workdir), 300, "a registered checkpoint")
        # only this test's own Ray (started by this process) is searched: its workers are our descendants
        def workers():
            found = []
            for proc in psutil.Process().children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(proc.cmdline()):
                        found.append(proc)
                except psutil.Error:  # exited meanwhile
                    pass
            return found

        worker = wait_for(workers, 30, "the worker")
        worker[0].kill()
        killed.append(worker[0].pid)

    temp = Path(tempfile.gettempdir())
    litter_before = set(temp.glob("checkpoint_tmp_*"))
    killer = threading.Thread(target=kill_worker_after_first_checkpoint, daemon=True)
    killer.start()
    result = run_pipeline(load_config(None, overrides + ["failure.max_failures=1"]), "sft", str(workdir / "runs"))
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    assert result["metrics"]["sft/resumed_from_step"] > 0
    assert result["metrics"]["sft/steps"] == 80
    # the checkpoint resumed from is copied into the stage's work directory, which goes with the stage
    assert set(temp.glob("checkpoint_tmp_*")) <= litter_before
    for key in ("eval/vqa_accuracy", "eval/chartqa_relaxed_accuracy"):
        assert result["metrics"][key] == clean["metrics"][key], key


def test_unreachable_tracking_server_fails_before_any_work(workdir):
    cfg = load_config(None, ["tracking.uri=http://user:hunter2secret@127.0.0.1:9"])
    with pytest.raises(UserError, match="unreachable") as info:
        run_pipeline(cfg, "sft")
    assert "hunter2secret" not in str(info.value)
    assert not (workdir / "runs").exists()


def test_truncated_and_missing_checkpoints_are_named(tmp_path):
    from runtime.config import TinyModelConfig
    from stages import model as model_stage
    from stages.support import tinyvlm

    good = tinyvlm.build(["a b c"] * 10, TinyModelConfig(), 64, 0, tmp_path / "good")
    bad = tmp_path / "truncated"
    shutil.copytree(good, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=r"truncated/model.safetensors is not a valid safetensors file"):
        model_stage.check(load_config(None, [f"model.source={bad}"]))
    header = tmp_path / "header"
    shutil.copytree(good, header)
    (header / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="not a valid safetensors file"):
        model_stage.check(load_config(None, [f"model.source={header}"]))
    sharded = tmp_path / "sharded"
    shutil.copytree(good, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(UserError, match="shard .*model-00002-of-00002.safetensors listed in .* is missing"):
        model_stage.check(load_config(None, [f"model.source={sharded}"]))
    model_stage.check(load_config(None, [f"model.source={good}"]))  # the intact one passes


def test_eight_concurrent_writers_lose_nothing(ray_session, workdir):
    """8 processes (Ray tasks, as sweep trials are) log to one SQLite store at once: every metric arrives."""
    import ray

    from runtime.tracking import Tracker, log_step_metrics

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    tracker = Tracker(uri, "vlmlab")  # creates the DB and experiment first, in this process
    run_ids = [tracker.start(f"trial-{i}") for i in range(8)]

    @ray.remote(num_cpus=0.25)
    def trial(run_id: str) -> int:
        for step in range(40):
            log_step_metrics(uri, run_id, {"loss": 1.0 / (step + 1), "acc": step / 40}, step)
        return 40

    assert ray.get([trial.remote(r) for r in run_ids]) == [40] * 8
    for run_id in run_ids:
        for key in ("loss", "acc"):
            assert len(tracker.client.get_metric_history(run_id, key)) == 40
        tracker.end(run_id)


def test_actor_hung_on_its_way_out_is_reaped(ray_session):
    """An actor Ray counts as dead whose process never exits (Ray 2.60's core worker can deadlock in its exit
    handlers; here a Python exit handler that sleeps stands in for it) is SIGKILLed, not left to outlive Ray."""
    import psutil
    import ray

    from runtime.raytrain import reap_hung_actors

    @ray.remote(num_cpus=0)
    class HangsOnExit:
        def pid(self) -> int:
            import atexit

            atexit.register(time.sleep, 3600)
            return os.getpid()

        def leave(self) -> None:
            ray.actor.exit_actor()

    actor = HangsOnExit.remote()
    pid = ray.get(actor.pid.remote())
    actor.leave.remote()
    wait_for(lambda: any(a["Pid"] == pid for a in ray._private.state.actors(actor_state_name="DEAD").values()),
             30, "Ray to count the actor dead")
    time.sleep(1)
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # still hanging in its exit handler
    assert pid in reap_hung_actors()

    def dead() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(dead, 10, "the hung process to die")


def test_background_step_logger_keeps_order_and_falls_back_to_the_outbox(tmp_path, monkeypatch):
    """Step metrics written from the trainer's background thread: all arrive, in step order, with the time they
    were logged; with the store gone they go to the outbox (synced later); without an outbox close() raises."""
    from mlflow.exceptions import MlflowException

    from runtime.tracking import BackgroundStepLogger, Tracker, sync_outbox

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "vlmlab")
    run_id = tracker.start("steps")
    logger = BackgroundStepLogger(uri, run_id)
    before = time.time() * 1000
    for step in range(30):
        logger.log({"loss": 1.0 / (step + 1), "not_a_number": float("nan")}, step)
    logger.close()
    history = sorted(tracker.client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp)
    assert [m.step for m in history] == list(range(30))
    assert [m.value for m in history] == [1.0 / (s + 1) for s in range(30)]
    assert before - 1 <= history[0].timestamp <= history[-1].timestamp
    assert tracker.client.get_metric_history(run_id, "not_a_number") == []
    logger.log({"loss": 0.01}, 30)  # after close(): written directly, not lost
    assert len(tracker.client.get_metric_history(run_id, "loss")) == 31

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()  # closed again: nothing listens there
    gone = f"http://127.0.0.1:{port}"  # a tracking server that is not there
    (tmp_path / "run" / "sft").mkdir(parents=True)
    outbox = tmp_path / "run" / "sft" / "mlflow_outbox_worker.jsonl"
    offline = BackgroundStepLogger(gone, run_id, str(outbox))
    for step in range(31, 41):
        offline.log({"loss": 1.0 / (step + 1)}, step)
    offline.close()
    entries = [json.loads(line) for line in outbox.read_text().splitlines()]
    assert [e["metrics"][0]["step"] for e in entries] == list(range(31, 41))
    assert sync_outbox(uri, tmp_path / "run") == 10
    assert sorted(m.step for m in tracker.client.get_metric_history(run_id, "loss")) == list(range(41))

    failing = BackgroundStepLogger(gone, run_id)
    failing.log({"loss": 1.0}, 0)
    with pytest.raises(MlflowException, match=f"127.0.0.1:{port}"):  # the store's own error reaches the caller
        failing.close()
    tracker.end(run_id)


def test_redaction_survives_another_thread_changing_the_environment(monkeypatch):
    """MLflow's telemetry thread sets and deletes environment variables while a run logs its params; reading
    os.environ for secrets must not then fail with KeyError (it once failed a run this way)."""
    from runtime.secrets import redact_text

    monkeypatch.setenv("VLMLAB_TEST_TOKEN", "s3cr3t-value")
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            os.environ["_VLMLAB_CHURN"] = "x"
            del os.environ["_VLMLAB_CHURN"]

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(20_000):
            assert redact_text("key s3cr3t-value") == "key ***"
    finally:
        stop.set()
        thread.join()
