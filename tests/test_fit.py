"""The memory plan and `resources.fit: auto` (issue #33) on this CPU, with a declared device memory: the plan against
the same step at full depth with real tensors, the fit choosing a smaller batch (recorded, reproduced as chosen), and
a config that fits at no batch stopping before any work."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT, tiny_overrides

from runtime.config import load_config
from stages.support import fit, memory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The default preset's tiny model (a shell: its config, processor, tokenizer) and its synthetic rows."""
    cfg = load_config(None, tiny_overrides())
    rows = fit.standin_rows(cfg)
    shell = fit.model_shell(cfg, rows, tmp_path_factory.mktemp("tiny") / "model")
    return cfg, rows, shell


@pytest.mark.parametrize(("stage", "batch"), [("sft", 32), ("dpo", 16)])
def test_plan_predicts_the_real_full_depth_step_within_5_percent(tiny, stage, batch):
    """Traced at 1-2 layers and batch 1, extrapolated; measured with every layer at the default's batch. FLOPs are
    exact (linear in layers and batch); the peak within 5 % (#33's bar)."""
    cfg, rows, shell = tiny
    section = getattr(load_config(None, []), stage)
    plan = memory.trace_training(stage, section, shell, rows)
    measured = memory.measure_training(stage, section, shell, rows, batch)
    assert plan.flops(batch) == pytest.approx(measured["flops"], rel=1e-6)
    assert plan.peak(batch) == pytest.approx(measured["peak"], rel=0.05), (plan.peak(batch), measured["bytes"])


def test_generation_plan_within_5_percent(tiny):
    cfg, rows, shell = tiny
    plan = memory.trace_generation("eval", shell, rows, 8)
    points = {(p["vision"], p["text"]): p for p in plan.traced}
    assert set(points) == set(memory.TRACE_DEPTHS)
    full = memory._generation_point(shell, max(rows, key=lambda r: len(r["question"])), 8, 3, 4, 0)
    assert plan.peak(1) == pytest.approx(full["bytes"]["Total"], rel=0.05)
    assert plan.flops_per_sample == pytest.approx(full["flops"], rel=1e-6)


def test_fit_picks_the_largest_batch_that_fits_and_keeps_the_effective_batch(tiny, ray_session, workdir):
    """A declared device just big enough for half the configured batch: sft trains 4 x 2 instead of 8 x 1, the choice
    is in the config it ran, result.json, stage.json and the manifest, and `harness reproduce` keeps it."""
    from harness.pipeline import run_pipeline
    from harness.reproduce import recorded_config

    cfg, rows, shell = tiny
    plan = fit.plans_for(cfg, ["sft"], shell, rows)["sft"]
    device_gib = fit.RESERVE_GIB + plan.peak(4, 2) * 1.02 / fit.SLACK / fit.GIB  # batch 4 fits, 8 does not
    assert plan.peak(8) > fit.usable_bytes(device_gib)
    result = run_pipeline(load_config(None, tiny_overrides(**{"resources.device_memory_gb": device_gib})), "sft")
    chosen = result["fit"]["stages"]["sft"]
    assert (chosen["batch_size"], chosen["gradient_accumulation_steps"]) == (4, 2)
    assert chosen["configured"] == {"batch_size": 8, "gradient_accumulation_steps": 1,
                                    "gradient_checkpointing": False}
    assert result["config"]["sft"]["batch_size"] == 4 and result["config"]["sft"]["gradient_accumulation_steps"] == 2
    assert result["manifest"]["fit"]["stages"]["sft"]["batch_size"] == 4
    stage = json.loads((workdir / "runs" / result["run_id"] / "sft" / "stage.json").read_text())
    assert stage["fit"]["batch_size"] == 4 and stage["fit"]["predicted_gib"] <= fit.usable_bytes(device_gib) / fit.GIB
    assert result["metrics"]["sft/steps"] == 4  # the optimizer steps are the configured ones
    rerun = recorded_config(result, workdir / "runs" / result["run_id"] / "result.json", trust=False)
    assert rerun.resources.fit == "off" and rerun.sft.batch_size == 4  # reproduced as chosen, not re-fitted


@pytest.mark.slow  # traces the model before it stops (scripts/test --fast leaves it out)
def test_a_config_that_fits_at_no_batch_stops_before_any_work(tmp_path):
    args = [sys.executable, "-m", "harness.cli", "run", "sft", *tiny_overrides(**{"resources.device_memory_gb": 0.61}),
            "--output-dir", str(tmp_path / "runs")]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}",
                               "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: resources.fit: stage sft does not fit the declared device")
    assert "predicted" in lines[0] and "would fit:" in lines[0] and "a larger device (T4" in lines[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()


def test_fit_off_and_on_as_yaml_reads_them():
    """`resources.fit=off` is YAML's false: read as the switch it names, not rejected."""
    assert load_config(None, ["resources.fit=off"]).resources.fit == "off"
    assert load_config(None, ["resources.fit=on"]).resources.fit == "auto"
