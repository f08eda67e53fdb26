"""Ray Tune sweeps on the real stack: shared stages once, trials scored by eval; a space checked before any work."""
from __future__ import annotations

import json

import pytest
from helpers import property_settings, tiny_overrides
from hypothesis import given
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from harness.sweep import (
    COST_AWARE,
    check_objective,
    check_space,
    log_grid,
    parse_space,
    run_sweep,
    shared_prefix,
    space_extremes,
    sweep_base,
)
from runtime.config import load_config
from runtime.errors import UserError

PREF = {"dpo.max_steps": 2, "dpo.batch_size": 4, "dpo.save_steps": 2, "dpo.logging_steps": 1, "dpo.warmup_steps": 0,
        "eval.limit": 8}


@pytest.mark.parametrize("term, message", [
    ("dpo.beta", "expected key=sampler"),
    ("dpo.beta=lognormal(1,2)", "unknown sampler 'lognormal'"),
    ("dpo.beta=loguniform(1)", "loguniform takes 2 arguments"),
    ("dpo.beta=loguniform(0,1)", "positive lower bound"),
    ("dpo.beta=uniform(2,1)", "low < high"),
    ("dpo.beta=choice()", "one or more"),
    ("dpo.beta=uniform(nan,1)", "finite number"),
    ("dpo.beta=grid(0.1,inf)", "finite number"),
    ("dpo.max_steps=randint(1.5,9)", "randint takes whole numbers"),
])
def test_malformed_space_names_the_term(term, message):
    with pytest.raises(UserError, match=message):
        parse_space(["sft.learning_rate=choice(1e-4,3e-4)", term])


def test_space_and_prefix():
    space = parse_space(["dpo.beta=loguniform(0.01,1)", "sft.learning_rate=choice(1e-4, 3e-4)"])
    assert space == {"dpo.beta": ("loguniform", [0.01, 1]), "sft.learning_rate": ("choice", [1e-4, 3e-4])}
    assert log_grid(0.01, 1.0, 3) == [0.01, 0.1, 1.0]
    chain = ["data", "model", "sft", "dpo", "eval"]
    assert shared_prefix(chain, ["dpo.beta"]) == ["data", "model", "sft"]
    assert shared_prefix(chain, ["sft.grades.alpha"]) == ["data", "model"]
    assert shared_prefix(chain, ["seed"]) == []


def test_unknown_space_key_fails_before_anything_runs(workdir):
    cfg = load_config(None, [])
    with pytest.raises(UserError, match="unknown config key 'dpo.betta'"):
        run_sweep(cfg, "dpo", [], parse_space(["dpo.betta=grid(1,2)"]), 2, "eval/mean_accuracy", "max", None)
    assert not (workdir / "runs").exists()


SWEPT = ["dpo.beta", "dpo.max_steps", "dpo.learning_rate", "dpo.loss_type", "dpo.save_steps", "sft.save_steps",
         "sft.grades.alpha", "sft.grades.compute_interval", "eval.batch_size", "seed"]
NUMBERS = st.one_of(st.integers(-10, 3000), st.floats(-10, 3000, allow_nan=False), st.sampled_from([0, 1e-9, 1e9]))
VALUES = st.one_of(NUMBERS, st.sampled_from(["sigmoid", "ipo", "bogus", "true", "[1, 2]", "nan", "{a: 1}"]))
TERMS = st.lists(st.tuples(st.sampled_from(SWEPT), st.sampled_from(["uniform", "loguniform", "randint", "grid",
                                                                   "choice"]),
                           st.lists(VALUES, min_size=1, max_size=4)), min_size=1, max_size=3, unique_by=lambda t: t[0])


@property_settings(200)
@given(terms=TERMS, objective=st.sampled_from(["eval/mean_accuracy", "eval/sft_vqa_accuracy", "eval/nosuch",
                                               "gain_per_usd:eval/docvqa_anls", "mean_accuracy"]))
def test_any_space_is_refused_in_one_line_or_every_draw_is_a_valid_config(terms, objective):
    """Random --space terms over real keys: parse_space, the objective's and the space's pre-flight either refuse
    with a UserError or pass, and when they pass every value a trial can draw (random draws from each range, beyond
    the extremes the check uses) gives a config the schema accepts."""
    import random

    from runtime.config import PipelineConfig, merge, parse_overrides

    cfg = load_config(None, [])
    text = [f"{key}={sampler}({','.join(map(str, values))})" for key, sampler, values in terms]
    try:
        space = parse_space(text)
        base, _ = sweep_base(cfg, [], space)
        check_objective(base, "dpo", objective)
        stages = base.stages_of("dpo")
        check_space(base, stages[len(shared_prefix(stages, list(space))):], space)
    except UserError as exc:
        assert len(str(exc).splitlines()) == 1 and str(exc)
        return
    rng = random.Random(0)
    for _ in range(20):
        draw = {}
        for key, (sampler, values) in space.items():
            if sampler in ("grid", "choice"):
                draw[key] = rng.choice(values)
            elif sampler == "randint":
                draw[key] = rng.randrange(int(values[0]), int(values[1]))
            else:
                low, high = values
                draw[key] = low * (high / low) ** rng.random() if sampler == "loguniform" else rng.uniform(low, high)
                assert draw[key] in space_extremes(sampler, values) or not float(draw[key]).is_integer()
        tree = merge(base.model_dump(mode="json"), parse_overrides([f"{k}={v}" for k, v in draw.items()]))
        PipelineConfig.model_validate(tree)  # raises if the pre-flight let a bad draw through


def test_dpo_beta_sweep_where_identical_trials_compute_once(ray_session, workdir):
    """dpo.beta over 0.1 (three times) and 1.0, two trials at a time: the shared stages run once before the trials;
    the three identical trials share one stage key, so one computes each stage while the others wait on its lease
    and reuse it, and all three report identical metrics (before leases they raced on one Ray storage); the best
    trial, the parent run and its children land in MLflow. (A value the schema refuses stops a sweep before any
    work: test_bad_input.)"""
    cfg = load_config(None, tiny_overrides(**PREF, **{"resources.cpus_per_worker": 1}))
    space = parse_space(["dpo.beta=grid(0.1, 0.1, 0.1, 1.0)"])
    sweep = run_sweep(cfg, "dpo", [], space, 4, "eval/mean_accuracy", "max", None)

    on_disk = json.loads((workdir / "runs" / sweep["sweep_id"] / "sweep.json").read_text())
    trials = on_disk["trials"]
    assert [t["status"] for t in trials] == ["TERMINATED"] * 4, [t["error"] for t in trials]
    assert on_disk["shared_stages"] == ["data", "model", "sft"]
    assert sorted(t["params"]["dpo.beta"] for t in trials) == [0.1, 0.1, 0.1, 1.0]
    same = [t["metrics"] for t in trials if t["params"]["dpo.beta"] == 0.1]
    assert same[0] and all(m == same[0] for m in same)
    assert on_disk["best"]["objective"] == max(t["objective"] for t in trials)
    for t in trials:
        assert {"eval/vqa_accuracy", "eval/chartqa_relaxed_accuracy"} <= set(t["metrics"]) and t["cost_usd"] > 0

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vlmlab")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.info.run_id == sweep["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["best.dpo.beta"] == str(on_disk["best"]["params"]["dpo.beta"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trial_runs = [r for r in children if r.info.run_name.startswith("trial-")]
    assert len(trial_runs) == 4
    assert all("eval/vqa_accuracy" in r.data.metrics and r.data.metrics["cost/usd"] > 0 for r in trial_runs)
    # the shared stages ran once: one computed (not reused) sft stage run in the whole store
    sft_runs = [r for r in runs if r.data.tags.get("vlmlab.stage") == "sft"]
    assert sum(r.data.tags.get("vlmlab.reused") == "False" for r in sft_runs) == 1
    assert len(sft_runs) == 5  # the shared run + four trials reusing it
    dpo_runs = [r for r in runs if r.data.tags.get("vlmlab.stage") == "dpo"]
    assert len(dpo_runs) == 4 and sum(r.data.tags.get("vlmlab.reused") == "False" for r in dpo_runs) == 2
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.json", "sweep.png"}


def test_grades_pareto_and_pick():
    from harness.sweep import PRESETS, grades_pick, grades_stage, pareto_front

    assert grades_stage({"dpo.grades.vision_tau": 1, "dpo.grades.compute_interval": 1}) == "dpo"
    assert grades_stage({"dpo.grades.vision_tau": 1, "dpo.beta": 1}) is None
    assert grades_stage({"sft.grades.alpha": 1, "dpo.grades.alpha": 1}) is None
    for name, stage in (("grades", "sft"), ("grades-dpo", "dpo")):
        assert grades_stage(PRESETS[name].space(4)) == stage and PRESETS[name].objective == COST_AWARE
    points = [(1.2, 0.0), (1.6, -0.005), (2.0, -0.03), (1.5, -0.02), (1.2, -0.01)]
    assert pareto_front(points) == [True, True, True, False, False]
    rows = [{"params": {"i": i}, "grades": {"speedup": s, "accuracy_delta": d}} for i, (s, d) in enumerate(points)]
    assert grades_pick(rows)["params"] == {"i": 1}  # the fastest within 0.01 of the reference
    assert grades_pick(rows, tolerance=0.0)["params"] == {"i": 0}
    assert grades_pick(rows[2:4]) is None


def test_grades_sweep_measures_trials_against_a_reference(ray_session, workdir):
    """A sweep of GradES settings only: a reference run (taus 0) first, each trial's speed-up and accuracy delta
    against it, the Pareto front, the pick and pareto.png."""
    cfg = load_config(None, tiny_overrides(**{"sft.max_steps": 8, "sft.save_steps": 4, "sft.grades.alpha": 0.25,
                                              "sft.grades.compute_interval": 2, "sft.grades.vision_tau": 1e9}))
    space = parse_space(["sft.grades.language_tau=grid(0, 1e9)"])  # 1e9: everything frozen at the first check
    sweep = run_sweep(cfg, "sft", [], space, 2, COST_AWARE, "max", None)  # the GradES presets' objective

    on_disk = json.loads((workdir / "runs" / sweep["sweep_id"] / "sweep.json").read_text())
    grades = on_disk["grades"]
    assert grades["stage"] == "sft" and grades["metric"] == "eval/mean_accuracy"  # the objective's metric
    for t in on_disk["trials"]:  # scored by accuracy gained over the base model per dollar
        assert t["cost_usd"] > 0 and t["objective"] == pytest.approx(
            (t["metrics"]["eval/mean_accuracy"] - t["metrics"]["eval/base_mean_accuracy"]) / t["cost_usd"])
    assert grades["reference"]["steps"] == 8 and grades["reference"]["frozen_fraction"] == 0.0
    by_tau = {t["params"]["sft.grades.language_tau"]: t["grades"] for t in on_disk["trials"]}
    assert by_tau[0]["steps"] == 8 and by_tau[1e9]["steps"] == 2 and by_tau[1e9]["frozen_fraction"] == 1.0
    for view in by_tau.values():
        assert view["speedup"] == pytest.approx(grades["reference"]["stage_wall_seconds"] / view["stage_wall_seconds"])
        assert view["accuracy_delta"] == pytest.approx(view["metric"] - grades["reference"]["metric"])
    assert grades["pareto"] and (workdir / "runs" / sweep["sweep_id"] / "pareto.png").stat().st_size > 0
    pick = grades["pick"]
    assert pick is None or (pick["accuracy_delta"] >= -0.01 and grades["pick_overrides"][0].startswith("sft.grades."))
