"""Cost vs accuracy: the Pareto front, and `harness leaderboard` over real runs in a real MLflow store."""
from __future__ import annotations

import json

import pytest
from conftest import tiny_overrides
from typer.testing import CliRunner

from harness.cli import app
from harness.config import DEFAULT_PRICES, load_config
from harness.leaderboard import pareto_front
from harness.pipeline import run_pipeline


def test_pareto_front_known_points():
    #            cost, acc
    points = [(1.0, 0.50),   # front: cheapest
              (2.0, 0.70),   # front
              (2.0, 0.60),   # dominated by (2.0, 0.70)
              (3.0, 0.70),   # dominated: costlier, not better
              (4.0, 0.90),   # front: best
              (5.0, 0.85)]   # dominated by (4.0, 0.90)
    assert pareto_front(points) == [True, True, False, False, True, False]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [True, True]  # ties dominate no one


def test_empty_store_is_friendly(workdir):
    out = CliRunner().invoke(app, ["leaderboard"])
    assert out.exit_code == 0 and "No finished vlmlab runs" in out.output


def test_leaderboard_over_three_runs(ray_session, workdir):
    for tokens in (4, 6, 8):  # three settings; the cache shares data/model/sft between them
        run_pipeline(load_config(None, tiny_overrides(**{"eval.max_new_tokens": tokens})), "sft")
    out = CliRunner().invoke(app, ["leaderboard", "--format", "json", "--plot", str(workdir / "lb.png")])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output[out.output.index("["): out.output.rindex("]") + 1])
    assert len(rows) == 3
    for r in rows:
        assert r["usd"] == pytest.approx(r["accelerator_hours"] * DEFAULT_PRICES["CPU"], abs=1e-9)
        assert 0 < r["utilization"] <= 1
    assert any(r["pareto"] for r in rows)
    assert (workdir / "lb.png").stat().st_size > 5000
    md = CliRunner().invoke(app, ["leaderboard", "--format", "markdown", "--pipeline", "sft"])
    assert md.output.count("| ") > 3 and "accelerator_hours" in md.output
    none = CliRunner().invoke(app, ["leaderboard", "--pipeline", "dpo"])
    assert "No finished vlmlab runs" in none.output
