"""The console of `harness run` (issue #26): a page of progress, not the libraries' output, which goes to the logs."""
from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap

from helpers import ROOT

from harness import console as output


def _display(width: int = 120):
    from rich.console import Console

    buffer = io.StringIO()
    return output.Display(Console(file=buffer, force_terminal=False, width=width)), buffer


def test_plain_progress_lines_at_most_one_per_tenth_and_per_30s(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(output.time, "monotonic", lambda: clock[0])
    display, buffer = _display()
    slow = display.begin_stage("sft")
    slow.cost = lambda: 0.0123
    for step in range(1, 1001):  # 1,000 steps in 20 minutes: the 10 % rule binds
        clock[0] += 1.2
        slow.update(step, 1000, metric=("loss", 3.0 / step), global_batch=32)
        display.render(slow)
    display.end_stage("sft")
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 9, lines  # 10 % ... 90 %: the finished stage has a line of its own
    assert re.fullmatch(r"sft +100/1000 +10%  loss 0\.030  26\.7 samples/s  ETA 18m00s  \$0\.0123", lines[0]), lines

    buffer.truncate(0)
    buffer.seek(0)
    fast = display.begin_stage("dpo")
    for step in range(1, 401):  # 400 steps in 80 s: the 30 s rule binds
        clock[0] += 0.2
        fast.update(step, 400)
        display.render(fast)
    display.end_stage("dpo")
    assert len(buffer.getvalue().splitlines()) == 2, buffer.getvalue()
    display.close()


WORKER = textwrap.dedent("""
    import logging, os, sys, warnings
    from pathlib import Path
    from rich.console import Console
    from harness.console import Display
    from runtime.output import worker_output, write_progress

    display = Display(Console(force_terminal=False, width=120))
    display.logs = Path(sys.argv[1]) / "logs"  # as open_run() sets it, without the thread that polls twice a second
    stage = display.begin_stage("sft")
    log = stage.worker_log("rank0", progress=True)
    with worker_output(log):
        print("printed by the worker")
        os.write(2, b"written by C code with a token hf_abcdefghijklmnopqrstuvwxyz0123\\n")
        for _ in range(3):
            logging.getLogger("transformers.trainer").warning("a warning worth seeing\\nits second line")
        logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster.")
        warnings.warn("an API goes away", FutureWarning)
        write_progress(log.progress, {"label": "sft", "step": 5, "total": 10, "metric": ["loss", 1.5],
                                      "global_batch": 8})
    stage.poll()
    print("progress", stage.step, stage.total, stage.metric)
    display.end_stage("sft")
    display.close()
""")


def test_worker_output_goes_to_its_log_and_warnings_once_to_the_console(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    shown = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert shown == ["warning: transformers: a warning worth seeing", "warning: FutureWarning: an API goes away",
                     "progress 5 10 ('loss', 1.5)"], proc.stdout
    logs = tmp_path / "run" / "logs"
    text = (logs / "ray" / "sft.rank0.log").read_text()
    assert "printed by the worker" in text and "written by C code" in text and "its second line" in text
    assert "hf_abcdefghij" not in text  # redacted like the console
    assert not (logs / ".live").exists()  # the progress and warnings files go with the stage


def test_progress_from_the_mlflow_stream_where_rank0s_file_is_out_of_sight(tmp_path):
    """Rank 0 on another node without shared storage writes its progress file there: the driver then reads the step
    metrics rank 0 streams to the stage's MLflow run (a real SQLite store here), at most every STREAM_POLL_S."""
    from runtime.tracking import Tracker, latest_step, log_step_metrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "vlmlab")
    run_id = tracker.start("sft")
    display, buffer = _display()
    display.logs = tmp_path / "logs"
    stage = display.begin_stage("sft", lambda: latest_step(tracker.client, run_id, "sft", 1000, 64))
    stage.worker_log("rank0", progress=True)  # its file would be on rank 0's node: never written here
    stage.poll()
    assert stage.step == 0  # nothing streamed yet
    for step in (10, 20):
        log_step_metrics(uri, run_id, {"sft/loss": 2.0 / step, "sft/learning_rate": 1e-3}, step)
    stage.poll()
    assert stage.step == 0  # asked less than STREAM_POLL_S ago
    stage._asked -= output.STREAM_POLL_S
    stage.poll()
    assert (stage.step, stage.total, stage.metric) == (20, 1000, ("loss", 0.1))
    assert re.match(r"sft +20/1000 +2%  loss 0\.100", stage.line()), stage.line()
    display.end_stage("sft")
    display.close()

