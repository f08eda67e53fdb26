"""Faults to the `harness` process itself (SIGKILL, SIGTERM), injected for real into a subprocess.

Kept apart from the in-process Ray tests: each subprocess starts its own local Ray, so no module-scoped Ray
session may be alive meanwhile.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from helpers import (
    SLOW_SFT,
    checkpoints,
    local_runs,
    registered_checkpoint,
    start_mlflow_server,
    stop_session,
    tiny_overrides,
    wait_for,
)

pytestmark = pytest.mark.slow  # each test runs `harness` for real (scripts/test --fast leaves them out)


def _harness(root, *args: str) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _kill_when(root, args: list[str], ready, what: str, every: float = 0.5) -> str:
    """Start `harness` with ``args`` and SIGKILL it, its Ray and their workers (a lost node) as soon as ``ready()``
    (asked every ``every`` s); its output until then."""
    proc = _harness(root, *args)
    try:
        wait_for(lambda: ready() or proc.poll() is not None, 300, what, every)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
    finally:
        stop_session(proc)  # only then may the test read what Ray left on disk
    return proc.communicate(timeout=30)[0]


def _cached_answers(root) -> int:
    """Answers in the output dir's item cache (evals/item_cache.py), whole lines only (a kill may tear the last)."""
    count = 0
    for path in (root / "runs" / ".cache" / "eval-items").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                count += len(json.loads(line)["answers"])
            except ValueError:
                pass
    return count


def _finish(root, args: list[str]) -> tuple[int, str, str]:
    proc = _harness(root, *args)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        stop_session(proc)
    return proc.returncode, out, err


def test_sigkill_then_rerun_resumes_past_a_damaged_checkpoint(workdir):
    """`harness run` with a run_name, SIGKILLed mid-training once Ray has registered two checkpoints, the newest
    then torn: the same command warns once and resumes into the same run directory (cached stages, training from the
    checkpoint before the torn one: Ray's list is repaired instead of failing on every rerun). SIGKILLed again once
    the eval has answered its first batch, the same command generates only the answers the item cache lacks (that
    they score as an uninterrupted eval does: test_pipeline's shard-kill test). The killed attempts' MLflow runs end
    up KILLED, none RUNNING. Once finished, the name is taken: a clear error. (One run serves every check: each
    kill-and-resume costs a minute and a half here.)"""
    # one item a batch: 64 batches (2 tasks x 16 items x base and sft), so the kill lands mid-eval
    args = ["run", "sft", *tiny_overrides(**SLOW_SFT, **{"eval.batch_size": 1}), "run_name=resumable",
            "--output-dir", "runs"]
    _kill_when(workdir, args, lambda: registered_checkpoint(workdir, count=2), "2 checkpoints")
    _, runs = local_runs(workdir)
    assert any(r.info.status == "RUNNING" for r in runs)  # what a SIGKILL leaves behind...
    storage = next((workdir / "runs" / ".cache" / "ray").glob("sft-*"))
    snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    older, newest = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]][-2:]
    older_step = json.loads((storage / older / "checkpoint" / "trainer_state.json").read_text())["global_step"]
    weights = storage / newest / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write

    out = _kill_when(workdir, args, lambda: _cached_answers(workdir), "the eval's first answers", every=0.05)
    assert "marked KILLED" in out
    text = "".join(out.split())  # rich folds the warning's long path wherever the console width falls
    assert text.count("damagedcheckpoint") == 1 and f"resumingfrom{older}" in text, out
    kept = _cached_answers(workdir)

    rc, out, err = _finish(workdir, args)
    assert rc == 0, err[-3000:]
    result = sorted((workdir / "runs").glob("*/result.json"))
    assert len(result) == 1
    result = json.loads(result[0].read_text())
    assert result["reused_stages"] == ["data", "model", "sft"]  # sft finished in the second attempt
    assert result["metrics"]["sft/resumed_from_step"] == older_step >= 10 and result["metrics"]["sft/steps"] == 40
    answers = _eval_outputs(result)["answers"]
    assert answers == {"cached": kept, "generated": 64 - kept} and 0 < kept < 64, (answers, kept)
    _, runs = local_runs(workdir)
    assert not [r for r in runs if r.info.status == "RUNNING"]  # ...is cleaned up by the next run
    assert sum(r.info.status == "KILLED" for r in runs) >= 4  # the killed attempts' parent, sft and eval runs
    rc, out, err = _finish(workdir, args)
    assert rc == 2 and "has already finished" in err and "--force" in err, err[-2000:]


def _eval_outputs(result: dict) -> dict:
    return next(s for s in result["stages"] if s["name"] == "eval")["outputs"]


def test_sigterm_marks_runs_killed_and_says_how_to_resume(workdir):
    proc = _harness(workdir, "run", "sft", *tiny_overrides(**SLOW_SFT), "--output-dir", "runs")
    try:
        wait_for(lambda: checkpoints(workdir) or proc.poll() is not None, 300, "training to start")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        stop_session(proc)
    assert proc.returncode == 130
    assert "rerun the same command to resume" in " ".join(err.split())
    _, runs = local_runs(workdir)
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    assert {r.info.status for r in runs if r.data.tags.get("vlmlab.stage") in (None, "sft")} == {"KILLED"}
    assert not list((workdir / "runs").glob("*/result.json"))


def test_tracking_server_lost_mid_run_then_synced(workdir):
    """The MLflow server dies during training: the run finishes, keeps every write locally, says how to sync;
    `harness sync` against the restarted server then completes the record."""
    from mlflow.tracking import MlflowClient

    server = start_mlflow_server(workdir)  # its own: this test kills it
    port, uri = server.port, server.uri
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", "sft", *tiny_overrides(**SLOW_SFT),
                             "--output-dir", "runs"], cwd=workdir, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(lambda: checkpoints(workdir) or proc.poll() is not None, 300, "training to start")
        stop_session(server.proc)  # the tracking server goes away mid-stage
        out, err = proc.communicate(timeout=600)
    finally:
        stop_session(proc)
        stop_session(server.proc)
    assert proc.returncode == 0, err[-3000:]
    run_dir = next((workdir / "runs").glob("*/result.json")).parent
    assert "harness sync" in out and (run_dir / "mlflow_outbox.jsonl").exists()
    result = json.loads((run_dir / "result.json").read_text())

    server = start_mlflow_server(workdir, port)  # restarted on its store
    try:
        synced = subprocess.run([sys.executable, "-m", "harness.cli", "sync", str(run_dir), "--tracking-uri", uri],
                                cwd=workdir, capture_output=True, text=True, timeout=300, check=False)
        assert synced.returncode == 0, synced.stderr[-3000:]
        assert not (run_dir / "mlflow_outbox.jsonl").exists()
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("vlmlab").experiment_id])
        parents = [r for r in runs if r.data.tags.get("vlmlab.pipeline") == "sft"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        parent = parents[0]
        assert parent.data.metrics["eval/vqa_accuracy"] == result["metrics"]["eval/vqa_accuracy"]
        children = {r.data.tags["vlmlab.stage"]: r for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert set(children) == {"data", "model", "sft", "eval"}
        assert all(r.info.status == "FINISHED" for r in children.values())
        losses = client.get_metric_history(children["sft"].info.run_id, "sft/loss")
        assert len(losses) == 40  # logging_steps=1: every step arrived, before and after the outage
    finally:
        stop_session(server.proc)


DISK_FULL_SCRIPT = r"""
set -u
mount -t tmpfs -o size=400m tmpfs "$OUT"
H="$PY -m harness.cli run sft $ARGS --output-dir $OUT/runs"
$H > first.log 2>&1 || { echo "FIRST_FAILED"; cat first.log; exit 3; }
(cd "$OUT/runs" && find . -type f ! -path './.cache/ray/*' | sort | xargs sha256sum) > before.sha
avail=$(df --output=avail -k "$OUT" | tail -1)
dd if=/dev/zero of="$OUT/filler" bs=1k count=$((avail - 2048)) status=none  # leave ~2 MB
$H sft.max_steps=6 > second.log 2> second.err
echo "SECOND_RC=$?"
(cd "$OUT/runs" && sha256sum -c --quiet ../../before.sha) && echo "INTACT"
"""


def test_disk_full_gives_a_clear_error_and_keeps_earlier_results(workdir):
    """A run on a full disk (a real 400 MB tmpfs in a private mount namespace) fails with a clear message;
    the earlier run's results and cache entries are untouched; its MLflow runs end FAILED."""
    (workdir / "mnt").mkdir()
    args = " ".join(tiny_overrides())
    script = workdir / "disk_full.sh"
    script.write_text(DISK_FULL_SCRIPT)
    env = dict(os.environ, OUT=str(workdir / "mnt"), PY=sys.executable, ARGS=args,
               MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    proc = subprocess.run(["unshare", "--mount", "bash", str(script)], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert "FIRST_FAILED" not in proc.stdout, proc.stdout[-3000:]
    assert "SECOND_RC=1" in proc.stdout, proc.stdout[-3000:] + (workdir / "second.err").read_text()[-3000:]
    err = (workdir / "second.err").read_text()
    flat = " ".join(err.split())
    assert "disk full" in flat and "No space left on device" in flat and "rerun the same command" in flat
    ours = [ln for ln in err.splitlines() if "pid=" not in ln]  # lines not forwarded from Ray's workers
    assert not any("Traceback" in ln for ln in ours)  # a message, not a crash of the harness itself
    assert "INTACT" in proc.stdout
    _, runs = local_runs(workdir)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert sum(r.info.status == "FAILED" for r in runs) >= 2  # the second run's parent and failing stage
