"""`harness estimate`: one calibration of the tiny preset (shrunk by tiny_overrides) through the real CLI, shared by
the module; a bad device is one line and exit 2 before any work."""
from __future__ import annotations

import io
import json

import pytest
from helpers import loopback_only, tiny_overrides
from rich.console import Console
from typer.testing import CliRunner

from harness.cli import app
from harness.estimate import DEVICES, render
from runtime.config import load_config

DEVICES_ASKED = ["cpu", "T4", "H100"]


def overrides() -> list[str]:
    """tiny_overrides, with every task of the preset shrunk like its first two (the calibration then cuts nothing)."""
    tasks = load_config(None, []).data.tasks
    return tiny_overrides(**{f"data.tasks.{k}.{split}_size": n for k in tasks
                             for split, n in (("train", 64), ("test", 16))})


@pytest.fixture(scope="module")
def estimated(tmp_path_factory):
    """`harness estimate sft <tiny overrides> --device cpu,T4 --device H100 --steps 4 --json`, run in an empty
    directory."""
    if not loopback_only():
        pytest.fail("Ray tests must run inside a loopback-only network namespace: use scripts/test")
    work = tmp_path_factory.mktemp("estimate")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        result = CliRunner().invoke(app, ["estimate", "sft", *overrides(), "--device", "cpu,T4",
                                          "--device", "H100", "--steps", "4", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), work


def test_a_row_per_device_priced_from_the_table(estimated):
    out, work = estimated
    cfg = load_config(None, overrides())
    assert list(out["devices"]) == DEVICES_ASKED
    for name, d in out["devices"].items():
        assert d["total_s"] > 0 and d["accelerator_hours"] > 0 and d["usd"] > 0, name
        assert all(s["wall_s"] > 0 for s in d["stages"].values()), name
        assert set(d["stages"]) == {"data", "model", "sft", "eval"}
        assert d["accelerator_hours"] == pytest.approx(d["total_s"] * d["devices"] / 3600)
        assert d["usd"] == pytest.approx(cfg.cost.prices[DEVICES[name].price_key] * d["accelerator_hours"])
    assert out["devices"]["cpu"]["measured_here"] and out["devices"]["cpu"]["devices"] == 2  # cores
    assert out["devices"]["T4"]["devices"] == 1 and not out["devices"]["T4"]["measured_here"]
    # the calibration ran in a temporary directory with its own MLflow store
    assert not (work / "runs").exists() and not (work / "mlflow.db").exists()
    assert out["calibration"]["overhead"]["mlflow_store_create_s"] > 0  # the user's store does not exist yet


def test_calibration_of_a_whole_run_predicts_itself(estimated):
    """tiny_overrides trains 4 steps, the calibration too, and eval scores every item: the prediction for this
    machine is the calibration's own stages, put back together from their parts."""
    out, _ = estimated
    calib = out["calibration"]["stages"]
    predicted = out["devices"]["cpu"]["stages"]
    for name in ("data", "model", "eval"):
        assert predicted[name]["wall_s"] == pytest.approx(calib[name]["wall_s"], rel=1e-6), name
    assert predicted["sft"]["wall_s"] == pytest.approx(calib["sft"]["wall_s"], rel=1e-3)
    assert calib["sft"]["steps"] == 4 and calib["sft"]["logged_steps"] == 4


def test_table_and_assumptions(estimated):
    out, _ = estimated
    buf = io.StringIO()
    render(out, Console(file=buf, width=200))
    text = buf.getvalue()
    rows = [line for line in text.splitlines() if line.strip("│ ").split(" ")[0] in DEVICES_ASKED]
    assert len(rows) == len(DEVICES_ASKED), text
    for phrase in ("predicted wall time per stage", "assumptions:", "MFU", "calibration here", "cost.prices"):
        assert phrase in text, phrase


@pytest.mark.parametrize("argv, problem", [
    (["estimate", "sft", "--device", "X100"], "unknown device 'X100'"),
    (["estimate", "nope", "--device", "T4"], "unknown pipeline 'nope'"),
    (["estimate", "sft", "--device", " , "], "--device: no device named"),
    (["estimate", "sft", "--device", "T4", "cost.prices={CPU: 1}"], "no price for device T4"),
])
def test_bad_input_is_one_line_before_any_work(argv, problem, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2 and problem in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
