"""`harness compare` (#35 item 3): the paired statistics held to scipy's own tests as the oracle on fixed tables, and
the command on two run directories as `harness run` writes them (result.json, the eval stage's predictions files),
including the bad inputs it must refuse in one line. No Ray, no server: seconds."""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import property_settings
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats
from typer.testing import CliRunner

from evals.registry import TASKS
from harness.cli import app
from harness.compare import paired_stats
from runtime.config import load_config


def _binary_table(n: int = 300, seed: int = 7) -> tuple[list[float], list[float]]:
    """Two correlated 0/1 score vectors, as two checkpoints answering the same items: B fixes ~12 % of A's misses and
    breaks ~6 % of its hits."""
    rng = np.random.default_rng(seed)
    a = (rng.random(n) < 0.45).astype(float)
    flip = rng.random(n)
    b = np.where(a == 1, (flip > 0.06).astype(float), (flip < 0.12).astype(float))
    return a.tolist(), b.tolist()


def test_mcnemar_and_the_interval_agree_with_scipy_on_a_fixed_table():
    a, b = _binary_table()
    got = paired_stats(a, b, seed=0)
    x, y = np.array(a), np.array(b)
    only_a, only_b = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    assert got["test"] == "McNemar exact" and got["discordant"] == [only_a, only_b]
    assert got["p_value"] == pytest.approx(stats.binomtest(only_b, only_a + only_b, 0.5).pvalue, rel=1e-12)
    assert got["difference"] == pytest.approx(y.mean() - x.mean())
    # scipy's own paired bootstrap (its default BCa interval, other resamples) as the oracle for the percentile one
    oracle = stats.bootstrap((x, y), lambda u, v, axis=-1: np.mean(v - u, axis=axis), paired=True, vectorized=True,
                             rng=np.random.default_rng(123)).confidence_interval
    assert abs(got["ci_low"] - oracle.low) <= 0.005 and abs(got["ci_high"] - oracle.high) <= 0.005, (got, oracle)
    # 80 % power: a paired z-test at the detectable difference has power 0.8 (normal approximation)
    sd = np.std(y - x, ddof=1)
    power = stats.norm.sf(stats.norm.ppf(0.975) - got["detectable"] * np.sqrt(len(a)) / sd)
    assert power == pytest.approx(0.8, abs=1e-6)
    # four times the items halve it
    assert paired_stats(a * 4, b * 4)["detectable"] == pytest.approx(got["detectable"] / 2, rel=0.01)


def test_fractional_scores_get_an_exact_paired_permutation_p_value():
    """ANLS-like scores on 12 items: 2^12 sign flips are fewer than the resamples, so the p-value is exact; the oracle
    enumerates every flip itself."""
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 1, 12).round(3)
    b = np.clip(a + rng.normal(0.15, 0.2, 12), 0, 1).round(3)
    got = paired_stats(a.tolist(), b.tolist())
    d = b - a
    observed = abs(d.mean())
    flips = [abs((d * np.array(signs)).mean()) for signs in itertools.product((1, -1), repeat=len(d))]
    exact = sum(f >= observed - 1e-12 for f in flips) / len(flips)
    assert got["test"] == "paired permutation"
    assert got["p_value"] == pytest.approx(exact, rel=1e-9)


def test_identical_scores_are_no_difference():
    a, _ = _binary_table(50)
    got = paired_stats(a, a)
    assert got["difference"] == got["ci_low"] == got["ci_high"] == 0.0 and got["p_value"] == 1.0
    assert got["detectable"] is None and got["discordant"] == [0, 0]


# -- the command, on run directories -------------------------------------------------------------------------------

def _write_run(root: Path, run_id: str, scores: dict[str, dict[str, list[float]]], cost: float,
               questions: list[str] | None = None) -> Path:
    """A finished dpo run as `harness run` leaves it: result.json (stages with their cost) and, per scored checkpoint
    and task, the eval stage's predictions file."""
    run = root / run_id
    (run / "eval").mkdir(parents=True)
    labels = list(scores)
    stages = [{"name": name, "cost_usd": cost * share, "accelerator_hours": cost * share * 10, "outputs": {}}
              for name, share in (("data", 0.0), ("model", 0.0), ("sft", 0.5), ("dpo", 0.3), ("eval", 0.2))]
    stages[-1]["outputs"] = {"scored": labels}
    (run / "result.json").write_text(json.dumps({
        "schema_version": 2, "run_id": run_id, "pipeline": "dpo", "config": load_config("tiny").model_dump(mode="json"),
        "metrics": {}, "manifest": {}, "stages": stages, "cost_usd": cost, "accelerator_hours": cost * 10}))
    for label, per_task in scores.items():
        for task, values in per_task.items():
            qs = questions or [f"question {i}?" for i in range(len(values))]
            lines = [json.dumps({"question": q, "answers": ["x"], "prediction": "x", TASKS[task].metric: v})
                     for q, v in zip(qs, values, strict=True)]
            (run / "eval" / f"predictions_{label}_{task}.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'no-store.db'}")  # none made: nothing to read
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    a, b = _binary_table()
    chart_a, chart_b = _binary_table(80, seed=11)
    _write_run(tmp_path / "runs", "A", {"sft": {"vqa": a, "chartqa": chart_a}, "dpo": {"vqa": b, "chartqa": chart_b}},
               cost=1.0)
    _write_run(tmp_path / "runs", "B", {"sft": {"vqa": a}, "dpo": {"vqa": a[:100]}}, cost=1.5)
    return tmp_path / "runs"


def _invoke(*argv: str):
    out = CliRunner().invoke(app, ["compare", *argv])
    assert "Traceback" not in out.output, out.output
    return out


def test_compare_sft_and_dpo_of_one_run_and_two_runs(runs):
    out = _invoke("A@sft", "A", "--json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    a, b = _binary_table()
    assert list(result["tasks"]) == ["vqa", "chartqa"]  # registry order, both scored by both checkpoints
    assert result["tasks"]["vqa"] == {"metric": "vqa_accuracy", **paired_stats(a, b)}
    assert (result["a"]["checkpoint"], result["b"]["checkpoint"]) == ("sft", "dpo")
    # making the sft model cost its run's stages up to sft; the dpo model, up to dpo; scoring is not part of either
    assert result["a"]["cost_usd"] == pytest.approx(0.5) and result["b"]["cost_usd"] == pytest.approx(0.8)
    assert result["cost_usd_difference"] == pytest.approx(0.3)
    assert result["accelerator_hours_difference"] == pytest.approx(3.0)

    # two runs: only the task both scored, on the items both scored (B's final model scored the first 100)
    result = json.loads(_invoke(str(runs / "A"), "B", "--json", "--tasks", "vqa").stdout)
    assert list(result["tasks"]) == ["vqa"] and result["tasks"]["vqa"]["items"] == 100
    assert result["tasks"]["vqa"] == {"metric": "vqa_accuracy", **paired_stats(b[:100], a[:100])}

    table = _invoke("A@sft", "A")
    assert table.exit_code == 0 and "cost to make each model" in table.output and "80 % power" in table.output
    assert "vqa" in table.output and "chartqa" in table.output and "…" not in table.output, table.output  # 80 columns


@pytest.mark.parametrize("argv, named", [
    (("A@rlhf", "A"), "the run scored no checkpoint 'rlhf'; it scored sft, dpo (write A@sft)"),
    (("A", "nosuch"), "no finished run 'nosuch'"),
    (("A", "B", "--tasks", "chartqa"), "--tasks: chartqa not scored by both runs; both scored vqa"),
    (("A", "B", "--tasks", "docs"), "--tasks: no task 'docs'"),
])
def test_bad_targets_are_one_line(runs, argv, named):
    out = _invoke(*argv)
    lines = out.output.strip().splitlines()
    assert out.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], out.output


def test_runs_that_scored_different_items_are_refused(runs, tmp_path):
    a, _ = _binary_table()
    _write_run(runs, "C", {"sft": {"vqa": a}}, cost=1.0, questions=[f"other question {i}?" for i in range(len(a))])
    out = _invoke("A", "C")
    assert out.exit_code == 2 and "vqa: item 0 differs between the runs" in out.output, out.output
    assert "scored different data" in out.output


@property_settings(100)
@given(line=st.binary(max_size=80) | st.builds(lambda v: json.dumps({"question": "question 5?", "prediction": "p",
                                                                      "vqa_accuracy": v}).encode(),
                                                st.none() | st.booleans() | st.floats() | st.text(max_size=4)
                                                | st.integers()))
def test_any_damaged_predictions_line_is_named(runs, line):
    a, _ = _binary_table()
    good = [json.dumps({"question": f"question {i}?", "prediction": "x", "vqa_accuracy": v}).encode() + b"\n"
            for i, v in enumerate(a)]
    path = runs / "A" / "eval" / "predictions_sft_vqa.jsonl"
    path.write_bytes(b"".join(good[:5]) + line + b"\n" + b"".join(good[6:]))
    out = _invoke("A@sft", "A", "--tasks", "vqa")
    assert out.exit_code in (0, 2), out.output
    if out.exit_code == 2:
        (single,) = out.output.strip().splitlines()
        named = re.search(r"predictions_sft_vqa.jsonl(, line [67]: | asks )", single)  # a bad line, or another item
        assert single.startswith("error: ") and named, single


def test_the_report_compares_the_final_model_with_the_base_model(runs):
    a, b = _binary_table()
    _write_run(runs, "D", {"base": {"vqa": a}, "sft": {"vqa": b}}, cost=1.0)
    out = CliRunner().invoke(app, ["report", "D"])
    assert out.exit_code == 0, out.output
    page = (runs / "D" / "report" / "report.html").read_text()
    row = paired_stats(a, b)
    assert "sft against the base model, item by item" in page
    assert f"{row['difference']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]" in page
    assert f"<td>{row['p_value']:.3g}</td><td>McNemar exact</td>" in page


def test_the_leaderboard_ties_by_the_paired_test_where_predictions_are_at_hand(runs):
    from harness.leaderboard import mark_ties

    a, b = _binary_table()

    def row(name, acc, run_dir):
        return {"run": name, "accuracy": acc, "ci_low": acc - 0.2, "ci_high": acc + 0.2,
                "run_dir": None if run_dir is None else str(runs / run_dir)}
    # B's final model (dpo) leads A's (sft, in run E): intervals overlap, yet the paired test tells them apart
    _write_run(runs, "E", {"sft": {"vqa": a}}, cost=1.0)
    rows = [row("A", np.mean(b), "A"), row("E", np.mean(a), "E"), row("gone", 0.4, "nosuch"), row("old", 0.3, None)]
    mark_ties(rows, "eval/vqa_accuracy")
    assert [r["tie"] for r in rows] == [False, False, True, True]  # the last two by their intervals
    assert rows[1]["tie_p"] == pytest.approx(paired_stats(a, b)["p_value"]) and rows[1]["tie_p"] < 0.05
    assert rows[2]["tie_p"] is None


def test_the_mean_over_tasks_is_tested_with_every_tasks_items_paired():
    """Two tasks of 6 items: 2^12 sign flips, fewer than the resamples, so the p-value is exact; the oracle enumerates
    them, with the statistic the leaderboard ranks by (the mean of the task means)."""
    from harness.compare import paired_p

    rng = np.random.default_rng(5)
    a = {t: ([f"q{i}" for i in range(6)], rng.uniform(0, 1, 6).round(2).tolist()) for t in ("vqa", "chartqa")}
    b = {t: (q, np.clip(np.array(s) + rng.normal(0.2, 0.3, 6), 0, 1).round(2).tolist()) for t, (q, s) in a.items()}
    d = [np.array(b[t][1]) - np.array(a[t][1]) for t in ("vqa", "chartqa")]
    observed = abs(np.mean([x.mean() for x in d]))
    flips = [abs(np.mean([(d[0] * s[:6]).mean(), (d[1] * s[6:]).mean()]))
             for s in map(np.array, itertools.product((1, -1), repeat=12))]
    exact = sum(f >= observed - 1e-12 for f in flips) / len(flips)
    assert paired_p(a, b, ["vqa", "chartqa"]) == pytest.approx(exact, rel=1e-9)
    assert paired_p(a, b, ["vqa", "docvqa"]) is None  # a task one side lacks: no paired test
