"""`harness run dpo` and `harness run grpo` end to end on the real stack, and their bad-input checks."""
from __future__ import annotations

import json

import pytest
from helpers import tiny_overrides
from mlflow.tracking import MlflowClient

from harness.pipeline import run_pipeline
from runtime.config import load_config
from runtime.errors import ConfigError
from stages import dpo

PREF = {"dpo.max_steps": 4, "dpo.batch_size": 4, "dpo.save_steps": 2, "dpo.logging_steps": 1,
        "dpo.warmup_steps": 0, "grpo.max_steps": 4, "grpo.batch_size": 8, "grpo.save_steps": 2,
        "grpo.num_generations": 4}


def _children(workdir, parent_id):
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vlmlab")
    runs = client.search_runs([exp.experiment_id])
    return client, {r.data.tags.get("vlmlab.stage"): r for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parent_id}


def test_dpo_pipeline(ray_session, workdir):
    cfg = load_config(None, tiny_overrides(**PREF, **{"dpo.preference.rejected": "on_policy",
                                                      "dpo.preference.chosen_style": "sentence"}))
    result = run_pipeline(cfg, "dpo")
    assert [s["name"] for s in result["stages"]] == ["data", "model", "sft", "dpo", "eval"]
    m = result["metrics"]
    for key in ("dpo/reward_margin_start", "dpo/reward_margin_end", "dpo/reward_accuracy", "eval/vqa_accuracy",
                "eval/sft_vqa_accuracy", "eval/sft_chartqa_relaxed_accuracy", "eval/base_vqa_accuracy"):
        assert key in m, key
    assert m["dpo/pairs"] == 128  # 64 + 64 training rows, each with a wrong answer to reject
    client, children = _children(workdir, result["mlflow_run_id"])
    assert set(children) == {"data", "model", "sft", "dpo", "eval"}
    margins = client.get_metric_history(children["dpo"].info.run_id, "dpo/rewards/margins")
    assert len(margins) == 4  # TRL's preference metrics streamed per step
    # `harness compare` on the real files of this run: its SFT model against its DPO model, item by item
    from typer.testing import CliRunner

    from harness.cli import app

    out = CliRunner().invoke(app, ["compare", f"{result['run_id']}@sft", result["run_id"], "--json"])
    assert out.exit_code == 0, out.output
    compared = json.loads(out.stdout)
    assert [row["items"] for row in compared["tasks"].values()] == [16, 16]  # vqa and chartqa, every test item
    row = compared["tasks"]["vqa"]  # (ChartQA's metric is the mean of its subsets' means, not of its items)
    assert row["a"] == pytest.approx(m["eval/sft_vqa_accuracy"]) and row["b"] == pytest.approx(m["eval/vqa_accuracy"])
    assert row["ci_low"] <= row["difference"] <= row["ci_high"] and 0 <= row["p_value"] <= 1
    assert compared["b"]["cost_usd"] > compared["a"]["cost_usd"] > 0  # DPO's stage on top of SFT's


def test_grpo_pipeline_with_user_reward(ray_session, workdir):
    reward_file = workdir / "my_reward.py"
    reward_file.write_text("def short(completions, **kw):\n    return [1.0 if len(str(c)) < 80 else 0.0 "
                           "for c in completions]\n")
    cfg = load_config(None, tiny_overrides(**PREF, **{"grpo.rewards": f"[accuracy, format, {reward_file}:short]"}))
    result = run_pipeline(cfg, "grpo")
    m = result["metrics"]
    assert [s["name"] for s in result["stages"]] == ["data", "model", "sft", "grpo", "eval"]
    assert 0.0 <= m["grpo/reward_start"] <= 1.0 and 0.0 <= m["grpo/reward_end"] <= 1.0
    client, children = _children(workdir, result["mlflow_run_id"])
    keys = client.get_run(children["grpo"].info.run_id).data.metrics
    assert {"grpo/rewards/accuracy_reward/mean", "grpo/rewards/format_reward/mean",
            "grpo/rewards/short/mean"} <= set(keys)


@pytest.mark.parametrize("spec, message", [
    ("no_such_reward", "grpo.rewards\\[0\\]: reward 'no_such_reward' is not a built-in"),
    ("json:nope", "json/__init__.py defines no top-level function 'nope'"),  # read, not imported
    ("missing_mod_xyz:f", "cannot find module 'missing_mod_xyz'"),
    ("/no/file.py:f", "file not found: /no/file.py"),
])
def test_unknown_reward_fails_at_check(spec, message):
    cfg = load_config(None, [f"grpo.rewards=[{spec}]"])
    with pytest.raises(ConfigError, match=message):
        run_pipeline(cfg, "grpo")


def test_preference_dataset_missing_chosen(workdir):
    from datasets import Dataset, Image

    from stages.support.synthetic import generate

    bad = workdir / "rlaif"
    bad.mkdir()
    rows = [{"image": r["image"], "question": r["query"], "rejected": "x"} for r in generate("bar-chartqa", 4, 0, 64)]
    Dataset.from_list(rows).cast_column("image", Image()).to_parquet(str(bad / "train.parquet"))
    cfg = load_config(None, [f"dpo.preference.source={bad}"])
    with pytest.raises(ConfigError, match="has no column 'chosen'"):
        run_pipeline(cfg, "dpo")
    assert not (workdir / "mlflow.db").exists() and not (workdir / "runs").exists()


def test_pairs_from_tasks_reject_a_wrong_answer_of_the_same_type(tmp_path):
    from datasets import Dataset

    from runtime.config import PreferenceDataConfig
    from stages.support import datasets as dsets
    from stages.support.synthetic import generate

    rows = dsets.canonicalize(generate("shapes-vqa", 60, 0, 64), "vqa", {}, "mem", None)
    path = tmp_path / "train.parquet"
    Dataset.from_list(rows, features=dsets.canonical_features()).to_parquet(str(path))
    pairs = dpo.pairs_from_tasks({"vqa": {"train": str(path)}}, PreferenceDataConfig(), seed=0)
    pools = {}
    for r in rows:
        pools.setdefault(r["question_type"], set()).add(r["answer"])
    # rows where >= 3 annotators gave every answer of the type have nothing to reject: skipped
    usable = [r for r in rows if pools[r["question_type"]] - dpo.accepted_answers(r["answer"], r["answers"])]
    assert len(pairs) == len(usable) >= 0.9 * len(rows)
    for p, row in zip(pairs, usable, strict=False):
        assert p["question"] == row["question"]
        assert p["chosen"] == row["answer"] and p["rejected"] != p["chosen"]
        assert sum(a == p["rejected"] for a in row["answers"]) < 3
        same_type = {r["answer"] for r in rows if r["question_type"] == row["question_type"]}
        assert p["rejected"] in same_type
