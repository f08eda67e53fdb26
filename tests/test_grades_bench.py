"""benchmarks/grades.py's pure parts (issue #27): intervals, frozen fraction over time, calibration, overrides, the
report writer. Fabricated rows, no Ray, no training."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("grades_bench", ROOT / "benchmarks" / "grades.py")
gb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gb)

HISTORY = {  # two vision and two language matrices, checked every 20 steps
    "v1": {"group": "vision", "changes": [[20, 9.0], [40, 4.0], [60, 1.0]], "frozen_at": 60},
    "v2": {"group": "vision", "changes": [[20, 7.0], [40, 2.0]], "frozen_at": 40},
    "l1": {"group": "language", "changes": [[20, 30.0], [40, 20.0], [60, 10.0], [80, 5.0]], "frozen_at": None},
    "l2": {"group": "language", "changes": [[20, 50.0], [40, 40.0], [60, 8.0], [80, 3.0]], "frozen_at": 80},
}


def test_frozen_fraction_over_time():
    assert gb.frozen_over_time(HISTORY) == [[20, 0.0, 0.0, 0.0], [40, 0.25, 0.5, 0.0], [60, 0.5, 1.0, 0.0],
                                            [80, 0.75, 1.0, 0.5]]
    assert gb.frozen_over_time({}) == []


def test_calibrate_takes_each_groups_median_at_the_nearest_check():
    assert gb.calibrate(HISTORY, 40) == {"vision": 3.0, "language": 30.0}
    assert gb.calibrate(HISTORY, 70) == {"vision": 1.5, "language": 9.0}  # v2 has no later check than 40: its last


def test_t_interval():
    low, high = gb.t_interval([1.0, 2.0, 3.0])
    half = 4.303 / math.sqrt(3)  # sd 1, t(0.975, 2 df)
    assert low == pytest.approx(2 - half) and high == pytest.approx(2 + half)
    assert gb.t_interval([0.5]) is None


def test_paired_bootstrap():
    same = {"vqa": ([0.0] * 50, ["x"] * 50)}
    assert gb.paired_bootstrap([same, same], samples=200) == (0.0, 0.0, 0.0)
    shifted = {"vqa": ([0.1] * 40, ["x"] * 40), "chartqa": ([-0.1] * 20 + [0.3] * 20, ["human"] * 20 +
                                                            ["augmented"] * 20)}
    est, low, high = gb.paired_bootstrap([shifted], samples=200)
    assert est == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)  # per-subset means
    noisy = [{"vqa": ([1.0, 0.0, -1.0, 0.0] * 25, ["x"] * 100)}, {"vqa": ([1.0, 0.0, 0.0, 0.0] * 25, ["x"] * 100)}]
    est, low, high = gb.paired_bootstrap(noisy, samples=500)
    assert est == pytest.approx(0.125) and low < est < high and high - low < 0.3


def test_item_deltas_need_the_same_items():
    off = {"vqa": {"questions": ["a", "b"], "scores": [1.0, 0.0], "subsets": ["x", "x"]}}
    on = {"vqa": {"questions": ["a", "b"], "scores": [1.0, 1.0], "subsets": ["x", "x"]}}
    assert gb.item_deltas(off, on) == {"vqa": ([0.0, 1.0], ["x", "x"])}
    with pytest.raises(ValueError, match="different items"):
        gb.item_deltas(off, {"vqa": on["vqa"] | {"questions": ["b", "a"]}})
    with pytest.raises(ValueError, match="different tasks"):
        gb.item_deltas(off, {})


def test_every_run_of_a_setting_has_a_valid_config(tmp_path):
    from runtime.config import load_config

    extra = [f"data.tasks.{t}.train_size=64" for t in ("vqa", "chartqa", "textvqa", "docvqa", "scienceqa")]
    dpo = load_config(None, gb.arm_overrides("dpo", 1, extra, ["vqa", "chartqa", "textvqa", "docvqa", "scienceqa"],
                                             1000) + gb.grades_overrides("dpo", 0.5, 2.0, 0.3, 10))
    assert dpo.seed == 1 and len(dpo.data.tasks) == 5 and not dpo.eval.score_base
    assert all(t.test_size == 1000 and t.train_size == 64 for t in dpo.data.tasks.values())
    assert dpo.dpo.grades.enabled and dpo.dpo.grades.language_tau == 2.0 and dpo.dpo.grades.compute_interval == 10
    # shift: the base model (tokenizer over both mixes), the source SFT, the arms; tasks sized in --set, dropped here
    base = load_config(None, gb.base_model_overrides(0, extra, gb.SOURCE_TASKS + gb.TARGET_TASKS))
    assert base.stages_of("base") == ["data", "model"] and len(base.data.tasks) == 5
    source = load_config(None, gb.source_sft_overrides(0, extra, ["sft.max_steps=30", "sft.save_steps=10"],
                                                       gb.SOURCE_TASKS, str(tmp_path)))
    assert list(source.data.tasks) == gb.SOURCE_TASKS and source.model.source == str(tmp_path)
    assert source.sft.max_steps == 30 and source.data.tasks["vqa"].test_size == 300
    arm = load_config(None, gb.arm_overrides("shift", 0, extra, gb.TARGET_TASKS, 1000, str(tmp_path))
                      + gb.grades_overrides("sft", 0, 0, 0.28, 20))
    assert list(arm.data.tasks) == gb.TARGET_TASKS and arm.data.tasks["docvqa"].test_size == 1000
    assert arm.model.source == str(tmp_path.resolve()) and arm.eval.score_base and arm.sft.grades.vision_tau == 0


def _row(seed, arm, wall, steps, mean, docvqa):
    return {"seed": seed, "arm": arm, "grades": [], "stage_wall_seconds": wall, "steps": steps, "max_steps": 400,
            "step_seconds": wall - 20, "backward_seconds": (wall - 20) / 2, "outside_steps_seconds": 20.0,
            "frozen_fraction": 0.0 if arm == "baseline" else 1.0,
            "frozen_over_time": [] if arm == "baseline" else gb.frozen_over_time(HISTORY),
            "metrics": {"eval/docvqa_anls": docvqa, "eval/scienceqa_accuracy": 2 * mean - docvqa,
                        "eval/mean_accuracy": mean, "eval/mean_accuracy_ci_low": 0.0, "eval/base_mean_accuracy": 0.1,
                        "eval/docvqa_anls/form": docvqa}}


def _summary(setting, walls_on, means_on, items=None):
    off = [_row(s, "baseline", 200.0, 400, 0.60, 0.5) for s in (0, 1)]
    on = [_row(s, "grades", w, 200, m, 0.5) for s, (w, m) in enumerate(zip(walls_on, means_on, strict=True))]
    context = {"command": "cmd", "description": "fabricated", "grades_settings": ["dpo.grades.enabled=true"],
               "tau_origin": "given", "tasks": ["docvqa", "scienceqa"], "test_size": 1000, "max_steps": 400}
    return gb.summarize(setting, "dpo", off, on, items or [None, None], context)


def test_summary_and_report(tmp_path):
    slow = _summary("shift", [160.0, 160.0], [0.58, 0.56])  # 1.25x, -0.03: not met
    assert slow["speedup"] == pytest.approx(1.25) and slow["accuracy_delta"] == pytest.approx(-0.03)
    assert slow["interval_method"].startswith("t-interval") and not slow["target_met"]
    low, high = slow["accuracy_delta_interval"]
    assert low < -0.03 < high and slow["accuracy_delta_interval_seeds"] == [low, high]
    assert set(slow["pairs"][0]["deltas"]) == {"eval/docvqa_anls", "eval/scienceqa_accuracy", "eval/mean_accuracy",
                                               "eval/docvqa_anls/form"}  # no interval bounds, no base_ scores
    items = [{"docvqa": ([0.0] * 10, ["x"] * 10), "scienceqa": ([0.0] * 10, ["x"] * 10)}] * 2
    fast = _summary("dpo", [100.0, 125.0], [0.60, 0.60], items)  # 2.0x and 1.6x, no change
    assert fast["target_met"] and fast["speedup"] == pytest.approx(1.8)
    assert fast["interval_method"].startswith("paired bootstrap") and fast["accuracy_delta_interval"] == [0.0, 0.0]

    gb.write_report(slow, tmp_path)
    md = (tmp_path / "grades_shift.md").read_text()
    assert "not met" in md and "Where the time went" in md and "| 0 | 200.0 | 160.0 | 1.25x |" in md
    assert (tmp_path / "grades_shift_frozen.png").stat().st_size > 0
    assert json.loads((tmp_path / "grades.json").read_text())["setting"] == "shift"
    gb.write_report(fast, tmp_path)
    index = json.loads((tmp_path / "grades.json").read_text())
    assert index["setting"] == "dpo" and index["speedup"] == pytest.approx(1.8)  # the setting that met the target
    assert index["accuracy_delta"] == 0.0 and index["accuracy_delta_interval"] == [0.0, 0.0] and index["runs"]
    assert set(index["settings"]) == {"dpo", "shift"} and index["settings"]["shift"]["target_met"] is False
    md = (tmp_path / "grades.md").read_text()
    assert "| dpo | dpo | 1.80x |" in md and "- shift: GradES stopped at step" in md and "- dpo:" not in md
    lossy = _summary("dpo-long", [100.0, 125.0], [0.60, 0.50])  # 1.8x, -0.05: fast enough, accuracy lost
    assert not lossy["target_met"]
    assert gb.shortfall("dpo-long", lossy).endswith("per seed pair +0.0000, -0.1000 (seed t-interval of the mean: "
                                                    "[-0.6853, +0.5853]); the largest loss: scienceqa_accuracy -0.2000 "
                                                    "in seed 1.")
