"""Cost vs accuracy: the Pareto front, and `harness leaderboard` over real runs in a real MLflow store."""
from __future__ import annotations

import base64
import html
import io
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import tiny_overrides
from typer.testing import CliRunner

from harness.cli import app
from harness.leaderboard import pareto_front
from harness.pipeline import run_pipeline
from runtime.config import DEFAULT_PRICES, load_config


def test_pareto_front_known_points():
    #            cost, acc
    points = [(1.0, 0.50),   # front: cheapest
              (2.0, 0.70),   # front
              (2.0, 0.60),   # dominated by (2.0, 0.70)
              (3.0, 0.70),   # dominated: costlier, not better
              (4.0, 0.90),   # front: best
              (5.0, 0.85)]   # dominated by (4.0, 0.90)
    # both axes the higher the better: the leaderboard passes costs negated
    assert pareto_front([(-cost, acc) for cost, acc in points]) == [True, True, False, False, True, False]
    assert pareto_front([(-1.0, 0.5), (-1.0, 0.5)]) == [True, True]  # ties dominate no one


def test_empty_store_is_friendly(workdir):
    out = CliRunner().invoke(app, ["leaderboard"])
    assert out.exit_code == 0 and "No finished vlmlab runs" in out.output


# every training stage in one run, each a few steps: sft (reused from the cache), dpo with GradES freezing the
# vision tower at step 2, grpo; eval then scores base, sft, dpo and grpo
FULL = {"pipelines.full": "[data, model, sft, dpo, grpo, eval]", "eval.max_new_tokens": 8,
        "dpo.max_steps": 6, "dpo.batch_size": 4, "dpo.save_steps": 3, "dpo.logging_steps": 1, "dpo.warmup_steps": 0,
        "dpo.preference.size": 32, "dpo.preference.rejected": "same_type", "dpo.grades.enabled": "true",
        "dpo.grades.alpha": 0.3, "dpo.grades.compute_interval": 1, "dpo.grades.vision_tau": 1e9,
        "dpo.grades.language_tau": 0, "grpo.max_steps": 4, "grpo.batch_size": 8, "grpo.save_steps": 2,
        "grpo.num_generations": 4, "grpo.logging_steps": 1}


@pytest.fixture(scope="module")
def three_runs(ray_session, tmp_path_factory):
    """An MLflow store holding three finished runs: two sft runs that differ in one setting, then one `full` run
    (see FULL). The cache shares data/model/sft between them."""
    root = tmp_path_factory.mktemp("three_runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        for tokens in (4, 6):
            run_pipeline(load_config(None, tiny_overrides(**{"eval.max_new_tokens": tokens})), "sft")
        run_pipeline(load_config(None, tiny_overrides(**FULL)), "full")
    return root


@pytest.fixture
def in_three_runs(three_runs, monkeypatch):
    monkeypatch.chdir(three_runs)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{three_runs / 'mlflow.db'}")
    return three_runs


def _json_rows(result) -> list[dict]:
    """The rows `--format json` printed: stdout is the JSON and nothing else (stderr, which the CliRunner keeps
    apart, may carry the fixtures' Ray log lines: a raylet's disk warning broke a parse of the mixed output)."""
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_leaderboard_over_three_runs(in_three_runs):
    workdir = in_three_runs
    out = CliRunner().invoke(app, ["leaderboard", "--format", "json", "--plot", str(workdir / "lb.png")])
    assert out.exit_code == 0, out.output
    rows = _json_rows(out)
    assert len(rows) == 3
    for r in rows:
        assert r["usd"] == pytest.approx(r["accelerator_hours"] * DEFAULT_PRICES["CPU"], abs=1e-9)
        assert 0 < r["utilization"] <= 1
    assert any(r["pareto"] for r in rows)
    # the runs answered the same test items: the leader's ties are decided by the paired test (harness compare's)
    assert rows[0]["tie_p"] is None and all(isinstance(r["tie_p"], float) for r in rows[1:]), rows
    assert all(r["tie"] == (r["tie_p"] >= 0.05) for r in rows[1:])
    assert (workdir / "lb.png").stat().st_size > 5000
    md = CliRunner().invoke(app, ["leaderboard", "--format", "markdown", "--pipeline", "sft"])
    assert md.output.count("| ") > 3 and "accelerator_hours" in md.output
    table = CliRunner().invoke(app, ["leaderboard"])
    assert "viewStateShareKey=vlmlab-cost" in table.output
    none = CliRunner().invoke(app, ["leaderboard", "--pipeline", "dpo"])
    assert "No finished vlmlab runs" in none.output


def _harness(*args: str):
    """`harness ARGS` as an 80-column terminal shows it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "80")  # rich reads it at each print
        return CliRunner().invoke(app, list(args))


def _table_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "──" in line or re.search(r"\d{8}-\d{6}-", line)]


def test_leaderboard_fits_80_columns_sorts_and_filters(in_three_runs):
    rows = _json_rows(CliRunner().invoke(app, ["leaderboard", "--format", "json"]))
    out = _harness("leaderboard")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    header = next(line for line in lines if " run " in line)
    assert header.split() == ["run", "pipe", "model", "acc", "acc-h", "USD", "$/pt", "util"], header
    table = lines[:next(i for i, line in enumerate(lines) if line.startswith("★ Pareto"))]
    assert max(len(line) for line in table) <= 80 and "…" not in header, out.output
    assert [line.split()[-8] for line in lines if "-sft-" in line or "-full-" in line] == [r["run"] for r in rows]

    def order(*args: str) -> list[dict]:
        result = CliRunner().invoke(app, ["leaderboard", "--format", "json", *args])
        assert result.exit_code == 0, result.output
        return _json_rows(result)

    by_usd = order("--sort", "usd")
    assert [r["usd"] for r in by_usd] == sorted(r["usd"] for r in rows)
    assert by_usd[-1]["pipeline"] == "full"  # three training stages cost more than one
    assert [r["run"] for r in order("--sort", "run")] == sorted(r["run"] for r in rows)
    assert [r["accuracy"] for r in order("--sort", "acc")] == sorted((r["accuracy"] for r in rows), reverse=True)
    sft = order("--filter", "pipeline=sft")
    assert len(sft) == 2 and {r["pipeline"] for r in sft} == {"sft"}
    assert [r["pipeline"] for r in order("--filter", "model=TI*", "--filter", "pipeline=full")] == ["full"]
    none = CliRunner().invoke(app, ["leaderboard", "--filter", "model=*SmolVLM*"])
    assert "No finished vlmlab runs" in none.output
    for bad, message in ((["--sort", "speed"], "--sort: unknown column 'speed'"),
                         (["--filter", "seed=1"], "--filter 'seed=1': give KEY=VALUE")):
        result = CliRunner().invoke(app, ["leaderboard", *bad])
        assert result.exit_code == 2 and message in result.output, result.output


def test_runs_lists_recent_runs_in_80_columns(in_three_runs, tmp_path):
    results = sorted((json.loads(p.read_text()) for p in (in_three_runs / "runs").glob("*/result.json")),
                     key=lambda r: r["run_id"], reverse=True)
    unfinished = tmp_path / "20991231-000000-dpo-abcdef"  # a run directory MLflow does not know, without result
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("seed: 0\n")
    out = _harness("runs")
    assert out.exit_code == 0, out.output
    table = _table_lines(out.output)
    assert table and max(len(line) for line in table) <= 80 and "…" not in out.output, out.output
    listed = [line.split() for line in table if "──" not in line]
    assert [cells[0] for cells in listed] == [r["run_id"] for r in results]  # newest first
    for cells, r in zip(listed, results, strict=True):
        assert cells[1:3] == [r["pipeline"], "finished"]
        assert cells[3] == f"{r['metrics']['eval/mean_accuracy']:.3f}" and cells[-1] == f"{r['cost_usd']:.3g}"
    both = _harness("runs", "--output-dir", str(tmp_path), "--limit", "2")
    listed = [line.split() for line in _table_lines(both.output) if "──" not in line]
    assert [cells[:3] for cells in listed] == [[unfinished.name, "dpo", "incomplete"],
                                               [results[0]["run_id"], "full", "finished"]]


def _chromium() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _browse(browser: str, url: str, *mode: str, size: str = "2400,1000") -> subprocess.CompletedProcess:
    """Headless Chromium as STACK.md runs it; `mode` is --dump-dom or --screenshot=FILE."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=20000", f"--window-size={size}", *mode, url],
            capture_output=True, text=True, timeout=180)


def _full_run(root: Path) -> Path:
    return next((root / "runs").glob("*-full-*"))


def test_report_reads_each_stage_from_the_run_that_trained_it(in_three_runs):
    """Training curves come from MLflow's metric history: the `full` run reused sft from the cache, so sft's loss is
    read from the child run of the sft run that computed it."""
    from harness.report import curves, grades_curves, resolve

    run = resolve(_full_run(in_three_runs).name, None, None, "runs")
    assert run.result["reused_stages"] == ["data", "model", "sft"] and not run.notes
    got = curves(run)
    assert got["sft"]["loss"][0] == [1, 2, 3, 4]  # sft.max_steps=4, logged every step
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        assert got["dpo"][key][0] == [1, 2, 3, 4, 5, 6], key
    assert all(0 <= a <= 1 for a in got["dpo"]["rewards/accuracies"][1])
    assert got["grpo"]["reward"][0] == [1, 2, 3, 4] and "rewards/accuracy_reward/mean" in got["grpo"]
    frozen = grades_curves(run, got)["dpo"]  # vision frozen from step 2 on (alpha 0.3 x 6 steps), language never
    assert frozen["vision"][1] == [0.0] + [1.0] * 5 and set(frozen["language"][1]) == {0.0}
    assert 0 < frozen["all"][1][-1] < 1


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (scripts/test installs it where apt can)")
def test_report_renders_in_chromium(in_three_runs, tmp_path):
    """`harness report RUN`: one self-contained HTML file whose embedded figures are the PNG files beside it, logged
    to the run's MLflow run; in headless Chromium every figure decodes at its full size and the page is drawn."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    run_dir = _full_run(in_three_runs)
    out = _harness("report", run_dir.name)  # a run id, found under ./runs
    assert out.exit_code == 0 and "report written to" in out.output, out.output
    page = (run_dir / "report" / "report.html").read_text()
    pngs = {p.stem: p.read_bytes() for p in (run_dir / "report").glob("*.png")}
    assert set(pngs) == {"loss", "dpo_rewards", "grpo_rewards", "accuracy", "cost", "held", "grades"}
    embedded = [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert sorted(embedded) == sorted(pngs.values())  # the same figures, each once
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from elsewhere
    for section in ("Training loss", "DPO reward margin and accuracy", "GRPO rewards", "Accuracy per question type",
                    "Cost per stage", "Held device time per stage", "GradES: frozen weight matrices", run_dir.name):
        assert section in page, section
    result = json.loads((run_dir / "result.json").read_text())
    logged = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).list_artifacts(result["mlflow_run_id"], "report")
    assert {a.path for a in logged} == {"report/report.html", *(f"report/{stem}.png" for stem in pngs)}

    # the page as a browser draws it: a copy with a script that lists each <img>'s decoded size
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", """<script>addEventListener("load", () => document.body.insertAdjacentHTML(
        "beforeend", "<pre id=sizes>" + [...document.images].map(i => i.naturalWidth + "x" + i.naturalHeight)
        .join(" ") + "</pre>"));</script></body>"""))
    dom = _browse(_chromium(), probe.as_uri(), "--dump-dom").stdout
    drawn = re.search(r'<pre id="sizes">([^<]*)</pre>', dom).group(1).split()
    assert drawn == ["{}x{}".format(*Image.open(io.BytesIO(png)).size) for png in embedded], drawn
    shot = tmp_path / "report.png"
    _browse(_chromium(), (run_dir / "report" / "report.html").as_uri(), f"--screenshot={shot}", size="1400,4200")
    gray = Image.open(shot).convert("L")
    inked = sum(gray.histogram()[:200]) / (gray.width * gray.height)  # lines, bars, text
    assert inked > 0.02, f"the page is (nearly) blank: {inked:.3%} of it inked"


def test_harness_ui_serves_the_cost_view(in_three_runs):
    """`harness ui` starts MLflow's UI on the run store and prints the cost view's address; it answers /health and,
    in a real headless browser, the view lists the runs by name with the cost columns. SIGTERM to its PID stops it
    and the server it started."""
    workdir = in_three_runs
    rows = _json_rows(CliRunner().invoke(app, ["leaderboard", "--format", "json"]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen([str(Path(sys.executable).with_name("harness")), "ui", "--port", str(port)], cwd=workdir,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=os.environ | {"PYTHONUNBUFFERED": "1"})
    lines: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=lambda: [lines.put(line) for line in ui.stdout], daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    try:
        printed, deadline = "", time.time() + 180
        while "runs with their cost:" not in printed:
            assert ui.poll() is None and time.time() < deadline, f"harness ui did not come up: {printed}"
            try:
                printed += lines.get(timeout=1)
            except queue.Empty:
                pass
        url = printed.split("runs with their cost:")[1].split()[0]
        assert url == f"{base}/#/experiments/{rows[0]['experiment_id']}/runs?viewStateShareKey=vlmlab-cost"
        assert urllib.request.urlopen(f"{base}/health", timeout=10).read() == b"OK"
        browser = _chromium()
        if browser:  # scripts/test installs chromium where apt can
            shot = workdir / "mlflow_runs.png"
            _browse(browser, url, f"--screenshot={shot}")
            dom = _browse(browser, url, "--dump-dom").stdout
    finally:
        ui.send_signal(signal.SIGTERM)  # handled like Ctrl-C
        code = ui.wait(timeout=60)
    assert code == 0
    with pytest.raises(OSError):  # the MLflow server went with it
        urllib.request.urlopen(f"{base}/health", timeout=5)
    if not browser:
        return
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
