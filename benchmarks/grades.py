"""GradES benchmark: one training stage with and without GradES, paired by seed (issue #27).

Settings (--setting):
  scratch  SFT from random init on the preset (the first benchmark; not the setting GradES is made for).
  dpo      DPO from the SFT checkpoint. Per seed one SFT run, shared by both arms through the stage cache (same
           data, same SFT checkpoint), then the DPO stage twice.
  shift    SFT of a trained checkpoint on a shifted task mix. Per seed: a base model whose tokenizer is trained on
           the text of both mixes (as a pretrained model's covers both), SFT on --source-tasks (default vqa, chartqa,
           textvqa: shapes, bar charts, words on signs) gives the trained checkpoint (or give one: --source DIR),
           then SFT from it (model.source) on --target-tasks (default docvqa, scienceqa: forms and diagrams, new
           tasks that build on the reading and the shape/colour/position skills of the first mix) in both arms.

Arms (same seed: same data, same init, same max_steps): baseline = GradES observing (tau 0: every matrix's L1 change
curve is recorded, nothing freezes); GradES = taus calibrated from the first baseline's curves (per group, the median
change of its matrices at --calibrate-at of training) or given (--tau-vision, --tau-language). GradES ends the stage
once every matrix is frozen. Eval: --test-size items per task (default 1000).

Per arm: stage wall, optimizer steps, step and backward seconds, frozen fraction at every check, every eval/* metric.
Per pair: each metric's delta (GradES - baseline) and the speed-up (baseline stage wall / GradES stage wall). The 95 %
interval of the mean paired accuracy delta is a paired bootstrap over test items when the eval stage's per-item
predictions are there (both arms score the same items: items are resampled per task and pair and the delta is
recomputed the way the metric is), else a t-interval over the seed pairs; the output says which. The bootstrap holds
the trained models fixed: the seed t-interval (also given, from 2 pairs on) is the one that covers training noise.

Writes <results>/grades_<name>.json, .md and _frozen.png (--name, default the setting), then grades.json / grades.md
over every setting written there: the best setting's numbers at the top level (target: >= 1.5x at a mean accuracy
delta >= -0.01).

    .venv/bin/python benchmarks/grades.py --setting dpo                   # 3 seeds
    .venv/bin/python benchmarks/grades.py --setting dpo --name dpo-long --set dpo.max_steps=500   # a longer budget
    .venv/bin/python benchmarks/grades.py --setting shift --set sft.max_steps=600
    .venv/bin/python benchmarks/grades.py --setting shift --source runs/<run>/sft/model --seeds 0 1 2

Run it inside a loopback-only namespace like the tests (Ray listens on all interfaces):
    unshare --net sh -c 'ip link set lo up; exec .venv/bin/python benchmarks/grades.py --setting dpo'
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness import report  # noqa: E402  (after the path: run as a script from anywhere)
from harness.report import stage_record  # noqa: E402

SETTINGS = {"scratch": "sft", "dpo": "dpo", "shift": "sft"}  # setting -> the pipeline, and the stage GradES runs in
SOURCE_TASKS = ["vqa", "chartqa", "textvqa"]
TARGET_TASKS = ["docvqa", "scienceqa"]
TARGET = {"speedup": 1.5, "accuracy_delta": -0.01}
EARLIER = ("eval/base_", "eval/prior_", "eval/sft_", "eval/align_", "eval/dpo_", "eval/grpo_")  # not the final model
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]


# -- overrides ---------------------------------------------------------------------------------------------------
def grades_overrides(stage: str, vision_tau: float, language_tau: float, alpha: float, interval: int) -> list[str]:
    return [f"{stage}.grades.enabled=true", f"{stage}.grades.alpha={alpha}",
            f"{stage}.grades.compute_interval={interval}", f"{stage}.grades.vision_tau={vision_tau}",
            f"{stage}.grades.language_tau={language_tau}"]


def task_overrides(keep: list[str], test_size: int | None) -> list[str]:
    """Keep only ``keep`` (every other registered task dropped), each with ``test_size`` test items if given."""
    from evals.registry import TASKS

    out = [f"data.tasks.{t}=null" for t in TASKS if t not in keep]
    return out + ([f"data.tasks.{t}.test_size={test_size}" for t in keep] if test_size else [])


def arm_overrides(setting: str, seed: int, extra: list[str], tasks: list[str], test_size: int,
                  source: str | None = None) -> list[str]:
    """What both arms of a pair share (after --set, so a task dropped here may have been sized there)."""
    out = [f"seed={seed}", *extra, *task_overrides(tasks, test_size)]
    if setting == "dpo":
        out.append("eval.score_base=false")  # the SFT checkpoint is scored (eval/sft_*): DPO's reference
    if setting == "shift":
        out.append(f"model.source={Path(source).resolve()}")  # scored as eval/base_*
    return out


def base_model_overrides(seed: int, extra: list[str], tasks: list[str]) -> list[str]:
    """shift, step 1: data and the base model only; its tokenizer learns the text of ``tasks`` (both mixes)."""
    return [f"seed={seed}", *extra, *task_overrides(tasks, None), "pipelines.base=[data, model]"]


def source_sft_overrides(seed: int, extra: list[str], source_extra: list[str], tasks: list[str],
                         init: str) -> list[str]:
    """shift, step 2: SFT of that base model on the source mix (the trained checkpoint)."""
    return [f"seed={seed}", *extra, *source_extra, f"model.source={init}", *task_overrides(tasks, None)]


# -- reading a run -----------------------------------------------------------------------------------------------
def stage_dir(result: dict, name: str) -> Path:
    """Where the stage's files are (the run that computed it, when this run reused it from the cache)."""
    return report.stage_dir(stage_record(result, name), result["run_dir"])


def calibrate(history: dict, at_step: float) -> dict[str, float]:
    """tau per group: the median over the group's matrices of the change at the check nearest ``at_step``."""
    taus = {}
    for group in ("vision", "language"):
        values = [min(e["changes"], key=lambda sc: abs(sc[0] - at_step))[1]
                  for e in history.values() if e["group"] == group and e["changes"]]
        taus[group] = float(f"{statistics.median(values):.4g}")
    return taus


def frozen_over_time(history: dict) -> list[list[float]]:
    """[step, frozen fraction, vision's, language's] at every check of a grades_history.json (0 for a group with no
    matrices)."""
    curves = report.frozen_fractions(history)
    steps = curves["all"][0] if curves else []
    return [[step, *(curves[g][1][i] if g in curves else 0.0 for g in ("all", "vision", "language"))]
            for i, step in enumerate(steps)]


def arm_row(result: dict, stage: str, seed: int, arm: str, grades: list[str]) -> dict:
    m, rec = result["metrics"], stage_record(result, stage)
    path = stage_dir(result, stage) / "grades_history.json"
    history = json.loads(path.read_text()) if path.exists() else {}
    wall, busy = rec["wall_seconds"], m[f"{stage}/step_seconds"]
    return {"seed": seed, "arm": arm, "grades": grades, "stage_wall_seconds": wall, "steps": m[f"{stage}/steps"],
            "max_steps": result["config"][stage]["max_steps"], "step_seconds": busy,
            "backward_seconds": m[f"{stage}/backward_seconds"], "outside_steps_seconds": wall - busy,
            "frozen_fraction": m.get(f"{stage}/grades/frozen_fraction", 0.0),
            "frozen_over_time": frozen_over_time(history),
            "metrics": {k: v for k, v in m.items() if k.startswith("eval/")}, "run_dir": result["run_dir"]}


def eval_items(result: dict, label: str) -> dict[str, dict]:
    """Per task, the final checkpoint's per-item scores in test order with each item's subset (the eval stage's
    predictions_<label>_<task>.jsonl, lines in doc order = rows of the data stage's test split); {} if absent."""
    import pyarrow.parquet as pq

    from evals.registry import TASKS

    tasks, out = stage_record(result, "data")["outputs"]["tasks"], {}
    for kind, files in tasks.items():
        path = stage_dir(result, "eval") / f"predictions_{label}_{kind}.jsonl"
        if not path.exists():
            return {}
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        test = pq.read_table(files["test"], columns=["question", "subset"]).to_pylist()[:len(lines)]
        if [r["question"] for r in test] != [x["question"] for x in lines]:
            raise ValueError(f"{path}: predictions are not in the test split's order")
        out[kind] = {"questions": [x["question"] for x in lines], "scores": [x[TASKS[kind].metric] for x in lines],
                     "subsets": [r["subset"] for r in test]}
    return out


# -- statistics --------------------------------------------------------------------------------------------------
def item_deltas(off: dict, on: dict) -> dict[str, tuple[list[float], list[str]]]:
    """Per task: (GradES score - baseline score per item, subsets); the two arms must have scored the same items."""
    if set(off) != set(on):
        raise ValueError(f"the arms scored different tasks: {sorted(off)} vs {sorted(on)}")
    out = {}
    for kind in off:
        if off[kind]["questions"] != on[kind]["questions"]:
            raise ValueError(f"{kind}: the arms scored different items")
        out[kind] = ([b - a for a, b in zip(off[kind]["scores"], on[kind]["scores"], strict=True)],
                     off[kind]["subsets"])
    return out


def metric_of(scores: list[float], groups: list[str]) -> float:
    """A task's metric from its item scores: the mean, or the mean of the subsets' means (ChartQA)."""
    by: dict[str, list[float]] = {}
    for s, g in zip(scores, groups, strict=True):
        by.setdefault(g, []).append(s)
    return sum(sum(v) / len(v) for v in by.values()) / len(by)


def paired_bootstrap(pairs: list[dict[str, tuple[list[float], list[str]]]], samples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """The mean over pairs of the mean over tasks of each task's metric delta, and its percentile interval: each
    resample draws every pair's items per task with replacement (the same items for both arms, so the per-item
    difference is resampled). Returns (estimate, low, high)."""
    import numpy as np

    from evals.metrics import bootstrap_metric, interval

    per_pair, estimates = [], []
    for p, tasks in enumerate(pairs):
        boots = [bootstrap_metric(d, g, samples, seed + 1000 * p + t) for t, (d, g) in enumerate(tasks.values())]
        per_pair.append(np.mean(boots, axis=0))
        estimates.append(statistics.mean(metric_of(d, g) for d, g in tasks.values()))
    low, high = interval(np.mean(per_pair, axis=0), level)
    return statistics.mean(estimates), low, high


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """95 % t-interval of the mean (None for fewer than 2 values)."""
    n = len(values)
    if n < 2:
        return None
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * statistics.stdev(values) / math.sqrt(n)
    return statistics.mean(values) - half, statistics.mean(values) + half


def metric_deltas(off: dict, on: dict) -> dict[str, float]:
    """GradES - baseline for every eval metric of the final model (no interval bounds, no earlier checkpoints)."""
    return {k: on[k] - v for k, v in off.items() if k in on and not k.startswith(EARLIER)
            and not k.endswith(("_ci_low", "_ci_high"))}


def summarize(setting: str, stage: str, off: list[dict], on: list[dict], items: list[dict | None],
              context: dict) -> dict:
    """The report's content from the paired rows (off[i], on[i]: the same seed) and each pair's item deltas."""
    pairs = []
    for a, b, it in zip(off, on, items, strict=True):
        pairs.append({"seed": a["seed"], "speedup": a["stage_wall_seconds"] / b["stage_wall_seconds"],
                      "backward_speedup": a["backward_seconds"] / b["backward_seconds"],
                      "deltas": metric_deltas(a["metrics"], b["metrics"]),
                      "items": {k: len(d) for k, (d, _) in it.items()} if it else None})
    deltas = [p["deltas"]["eval/mean_accuracy"] for p in pairs]
    seeds_ci = t_interval(deltas)
    if all(items):
        _, low, high = paired_bootstrap(items)
        method = ("paired bootstrap over test items (2000 resamples; items drawn per task and seed pair, the same "
                  "items for both arms; the trained models held fixed)")
    else:
        low, high = seeds_ci or (None, None)
        method = "t-interval over the seed pairs (no per-item predictions)"
    speedup, delta = statistics.mean(p["speedup"] for p in pairs), statistics.mean(deltas)
    from evals.registry import TASKS

    tasks = [f"eval/{TASKS[t].metric}" for t in context["tasks"]] + ["eval/mean_accuracy"]
    return context | {
        "setting": setting, "stage": stage, "seeds": [r["seed"] for r in off],
        "speedup": speedup, "speedup_backward": statistics.mean(p["backward_speedup"] for p in pairs),
        "accuracy_delta": delta, "accuracy_delta_interval": [low, high], "interval_method": method,
        "accuracy_delta_interval_seeds": list(seeds_ci) if seeds_ci else None,
        "task_deltas": {k: statistics.mean(p["deltas"][k] for p in pairs) for k in tasks},
        "target": TARGET, "target_met": speedup >= TARGET["speedup"] and delta >= TARGET["accuracy_delta"],
        "pairs": pairs, "runs": off + on}


# -- report ------------------------------------------------------------------------------------------------------
def fmt_interval(bounds, missing: str = "n/a") -> str:
    """'[-0.0028, +0.0024]' for a (low, high) pair of deltas; ``missing`` when there is none."""
    return f"[{bounds[0]:+.4f}, {bounds[1]:+.4f}]" if bounds and bounds[0] is not None else missing


def mean_sd(values: list[float], fmt: str = ".3f") -> str:
    if len(values) > 1:
        return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"
    return f"{values[0]:{fmt}}"


def plot_frozen(summary: dict, path: Path) -> bool:
    """Frozen fraction over steps for every GradES seed (overall solid, vision dashed, language dotted)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, row in enumerate(r for r in summary["runs"] if r["arm"] == "grades"):
        if not row["frozen_over_time"]:
            continue
        steps, overall, vision, language = zip(*row["frozen_over_time"], strict=True)
        style = {"color": f"C{i}", "drawstyle": "steps-post"}  # the fraction changes at the checks
        ax.plot(steps, overall, lw=1.8, label=f"seed {row['seed']} (stopped at {row['steps']:.0f})", **style)
        ax.plot(steps, vision, lw=0.9, ls="--", **style)
        ax.plot(steps, language, lw=0.9, ls=":", **style)
    ax.axvline(summary["max_steps"], color="grey", lw=0.8)
    ax.set_xlabel("optimizer step (grey: max_steps)")
    ax.set_ylabel("frozen fraction of matrices")
    ax.set_title(f"GradES, {summary['setting']}: all (solid), vision (dashed), language (dotted)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(summary: dict, plot: str | None) -> str:
    s, off = summary, [r for r in summary["runs"] if r["arm"] == "baseline"]
    on = [r for r in summary["runs"] if r["arm"] == "grades"]
    tasks = list(s["task_deltas"])
    ci = fmt_interval(s["accuracy_delta_interval"], "n/a (one pair)")
    lines = [f"# GradES benchmark: {s['setting']} ({s['stage']} stage)", "", s["description"], "",
             f"Command: `{s['command']}`", "",
             f"GradES: `{' '.join(s['grades_settings'])}` ({s['tau_origin']}); baseline: the same with both taus 0 "
             f"(GradES observing, nothing frozen). Same max_steps ({s['max_steps']}) in both arms; eval items per "
             f"task: {s['test_size']}.", "",
             "| arm | stage wall s | steps | step s | backward s | outside steps s | frozen | "
             + " | ".join(t.removeprefix("eval/") for t in tasks) + " |",
             "|---" * (7 + len(tasks)) + "|"]
    for name, rows in (("baseline", off), ("GradES", on)):
        cells = [mean_sd([r[k] for r in rows], ".1f") for k in ("stage_wall_seconds", "steps", "step_seconds",
                                                                  "backward_seconds", "outside_steps_seconds")]
        cells.append(mean_sd([r["frozen_fraction"] for r in rows], ".2f"))
        cells += [mean_sd([r["metrics"][t] for r in rows], ".4f") for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed pair (GradES - baseline):", "",
              "| seed | baseline wall s | GradES wall s | speed-up | backward speed-up | GradES steps | "
              + " | ".join(f"Δ {t.removeprefix('eval/')}" for t in tasks) + " |",
              "|---" * (6 + len(tasks)) + "|"]
    for p, a, b in zip(s["pairs"], off, on, strict=True):
        lines.append(f"| {p['seed']} | {a['stage_wall_seconds']:.1f} | {b['stage_wall_seconds']:.1f} | "
                     f"{p['speedup']:.2f}x | {p['backward_speedup']:.2f}x | {b['steps']:.0f} | "
                     + " | ".join(f"{p['deltas'][t]:+.4f}" for t in tasks) + " |")
    seeds_ci = s["accuracy_delta_interval_seeds"]
    lines += ["", f"**Speed-up of the {s['stage']} stage** (baseline wall / GradES wall, mean over pairs): "
              f"**{s['speedup']:.2f}x**; backward time {s['speedup_backward']:.2f}x.",
              f"**Mean accuracy delta**: **{s['accuracy_delta']:+.4f}**, 95 % interval {ci} ({s['interval_method']})"
              + (f"; over the seed pairs (t): {fmt_interval(seeds_ci)}."
                 if seeds_ci and not s["interval_method"].startswith("t-") else "."),
              f"Target (>= {TARGET['speedup']}x at a mean delta >= {TARGET['accuracy_delta']}): "
              f"**{'met' if s['target_met'] else 'not met'}**.", ""]
    if plot:
        lines += [f"![frozen fraction over steps]({plot})", ""]
    if not s["target_met"]:
        need = statistics.mean(r["stage_wall_seconds"] for r in off) / TARGET["speedup"]
        outside = statistics.mean(r["outside_steps_seconds"] for r in on)
        steps_off = statistics.mean(r["step_seconds"] for r in off)
        lines += ["Where the time went (means over seeds, measured):", "",
                  f"- GradES stopped at step {mean_sd([r['steps'] for r in on], '.0f')} of {s['max_steps']}, "
                  f"final frozen fraction {mean_sd([r['frozen_fraction'] for r in on], '.2f')}.",
                  f"- At {TARGET['speedup']}x the GradES stage must end within {need:.1f} s; its time outside "
                  f"optimizer steps (Ray start, data loading, on-policy generation, saving) was {outside:.1f} s, so "
                  f"its steps may take {max(need - outside, 0):.1f} s: {max(need - outside, 0) / steps_off:.0%} of "
                  f"the baseline's {steps_off:.1f} s of steps.",
                  "- Each matrix's change curve with its tau: `grades_convergence.png` in the stage directories"
                  + (" (`run_dir` in the JSON)." if s.get("kept_runs") else " (rerun with --work DIR to keep them)."),
                  ""]
    return "\n".join(lines)


def write_report(summary: dict, out: Path) -> None:
    """grades_<setting>.json, .md, _frozen.png in ``out``, then the index over every setting there."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"grades_{summary['setting']}"
    plot = f"{name}_frozen.png" if plot_frozen(summary, out / f"{name}_frozen.png") else None
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    (out / f"{name}.md").write_text(markdown(summary, plot))
    write_index(out)


def shortfall(name: str, summary: dict) -> str | None:
    """One line on why a setting misses the target: where its GradES arm stopped and what the fixed time allows, or
    (fast enough) where the accuracy was lost; None without the per-arm rows."""
    runs = summary.get("runs") or []
    on = [r for r in runs if isinstance(r, dict) and r.get("arm") == "grades"]
    off = [r for r in runs if isinstance(r, dict) and r.get("arm") == "baseline"]
    if not (on and off):
        return None
    steps, max_steps = statistics.mean(r["steps"] for r in on), summary["max_steps"]
    head = (f"- {name}: GradES stopped at step {steps:.0f} of {max_steps} ({steps / max_steps:.0%}) for "
            f"{summary['speedup']:.2f}x at {summary['accuracy_delta']:+.4f}")
    if summary["speedup"] >= TARGET["speedup"]:  # fast enough: the accuracy is what misses; say where it was lost
        pairs = summary["pairs"]
        per_seed = ", ".join(f"{p['deltas']['eval/mean_accuracy']:+.4f}" for p in pairs)
        seed, task, worst = min(((p["seed"], t, p["deltas"][t]) for p in pairs for t in summary["task_deltas"]
                                 if t != "eval/mean_accuracy"), key=lambda x: x[2])
        return (f"{head}; per seed pair {per_seed} (seed t-interval of the mean: "
                f"{fmt_interval(summary.get('accuracy_delta_interval_seeds'))}); the largest loss: "
                f"{task.removeprefix('eval/')} {worst:+.4f} in seed {seed}.")
    wall = statistics.mean(r["stage_wall_seconds"] for r in off)
    fixed = statistics.mean(r["outside_steps_seconds"] for r in off) / wall
    return (f"{head}; {fixed:.0%} of the baseline stage is outside optimizer steps, so {TARGET['speedup']}x needs "
            f"the steps to end by {max(1 / TARGET['speedup'] - fixed, 0) / (1 - fixed):.0%} of the baseline's step "
            "time.")


def write_index(out: Path) -> dict:
    """grades.json / grades.md: every setting's headline; the best setting's summary at the top level (target met
    first, then a delta within the target, then the speed-up)."""
    found = {}
    for path in sorted(out.glob("grades_*.json")):
        data = json.loads(path.read_text())
        if "setting" in data and path.name == f"grades_{data['setting']}.json":
            found[data["setting"]] = data
    if not found:
        return {}
    best = max(found.values(), key=lambda d: (d["target_met"], d["accuracy_delta"] >= TARGET["accuracy_delta"],
                                              d["speedup"]))
    keys = ("speedup", "speedup_backward", "accuracy_delta", "accuracy_delta_interval", "interval_method",
            "accuracy_delta_interval_seeds", "target_met", "command", "seeds")
    index = best | {"settings": {n: {k: d[k] for k in keys} | {"details": f"grades_{n}.json"}
                                 for n, d in found.items()}}
    (out / "grades.json").write_text(json.dumps(index, indent=2))
    lines = ["# GradES benchmark", "",
             f"Target (issue #27): >= {TARGET['speedup']}x stage speed-up at a mean paired accuracy delta >= "
             f"{TARGET['accuracy_delta']}. Headline in grades.json: **{best['setting']}**.", "",
             "| setting | stage | speed-up | backward | accuracy delta | 95 % interval | target | details |",
             "|---|---|---|---|---|---|---|---|"]
    for n, d in found.items():
        lines.append(f"| {n} | {d['stage']} | {d['speedup']:.2f}x | {d['speedup_backward']:.2f}x | "
                     f"{d['accuracy_delta']:+.4f} | {fmt_interval(d['accuracy_delta_interval'])} | "
                     f"{'met' if d['target_met'] else 'not met'} | [grades_{n}.md](grades_{n}.md) |")
    why = [line for n, d in found.items() if not d["target_met"] and (line := shortfall(n, d))]
    if why:
        lines += ["", "Where a setting misses the target (measured; details and curves in its own file):", "", *why]
    sweeps = sorted(out.glob("grades_sweep_*.md"))
    if sweeps:
        lines += ["", "Sweeps (speed-up vs accuracy delta per trial, Pareto front, the pick): "
                  + ", ".join(f"[{p.name}]({p.name})" for p in sweeps) + "."]
    (out / "grades.md").write_text("\n".join(lines) + "\n")
    return index


# -- running -----------------------------------------------------------------------------------------------------
def run(config: str | None, overrides: list[str], pipeline: str, out: Path) -> dict:
    from harness.pipeline import run_pipeline
    from runtime.config import load_config

    return run_pipeline(load_config(config, overrides), pipeline, str(out))


def trained_checkpoint(args, seed: int, work: Path) -> tuple[str, dict]:
    """shift: a base model whose tokenizer covers both mixes, then SFT on the source mix; its model dir."""
    both = list(dict.fromkeys(args.source_tasks + args.target_tasks))
    base = run(args.config, base_model_overrides(seed, args.extra, both), "base", work)
    init = stage_record(base, "model")["outputs"]["model_dir"]
    src = run(args.config, source_sft_overrides(seed, args.extra, args.source_extra, args.source_tasks, init), "sft",
              work)
    sft = stage_record(src, "sft")
    print(f"seed {seed}: trained checkpoint {sft['outputs']['model_dir']} ({sft['wall_seconds']:.0f} s)", flush=True)
    return sft["outputs"]["model_dir"], {"seed": seed, "model_dir": sft["outputs"]["model_dir"],
                                         "sft_wall_seconds": sft["wall_seconds"],
                                         "metrics": {k: v for k, v in src["metrics"].items()
                                                     if k.startswith("eval/") and "_ci_" not in k}}


DESCRIPTIONS = {
    "scratch": "SFT from random init on the preset's tasks.",
    "dpo": "DPO from the SFT checkpoint: per seed one SFT run shared by both arms (same data, same checkpoint), then "
           "the DPO stage in each arm.",
    "shift": "SFT of a trained checkpoint on a shifted task mix: trained on {src}, fine-tuned on {dst}.",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=list(SETTINGS), default="scratch")
    ap.add_argument("--name", help="the results' name, grades_<name>.* (default: the setting's); a variant of a "
                    "setting (e.g. --set dpo.max_steps=500) keeps the setting's own record")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default=None, help="preset or YAML (default: the default preset)")
    ap.add_argument("--set", dest="extra", nargs="*", default=[], help="key=value overrides for every run")
    ap.add_argument("--test-size", type=int, default=1000, help="eval items per task (data.tasks.<t>.test_size)")
    ap.add_argument("--tau-vision", type=float, help="GradES vision_tau (default: calibrated)")
    ap.add_argument("--tau-language", type=float, help="GradES language_tau (default: calibrated)")
    ap.add_argument("--alpha", type=float, default=0.28, help="GradES grace period, fraction of max_steps")
    ap.add_argument("--compute-interval", type=int, default=20, help="GradES: steps between checks")
    ap.add_argument("--calibrate-at", type=float, default=0.5, help="fraction of training for tau calibration")
    ap.add_argument("--source", help="shift: the trained checkpoint (a model dir) instead of training one per seed")
    ap.add_argument("--source-tasks", default=",".join(SOURCE_TASKS), help="shift: the mix the checkpoint learns")
    ap.add_argument("--target-tasks", default=",".join(TARGET_TASKS), help="shift: the mix it is fine-tuned on")
    ap.add_argument("--source-set", dest="source_extra", nargs="*", default=[],
                    help="shift: key=value overrides for the source SFT only (after --set)")
    ap.add_argument("--work", help="keep the runs here (default: a temporary directory, removed at the end)")
    ap.add_argument("--results", default=str(ROOT / "results"))
    args = ap.parse_args()
    args.source_tasks = [t for t in args.source_tasks.split(",") if t]
    args.target_tasks = [t for t in args.target_tasks.split(",") if t]
    args.name = args.name or args.setting
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", args.name) or args.name.startswith("sweep"):
        ap.error(f"--name {args.name!r}: lower-case letters, digits and '-', not starting with 'sweep' "
                 "(grades_<name>.json is its results file)")
    if (args.tau_vision is None) != (args.tau_language is None):
        ap.error("give both --tau-vision and --tau-language, or neither (calibrated)")
    if args.source and (args.setting != "shift" or not (Path(args.source) / "config.json").is_file()):
        ap.error("--source: a model directory (with config.json), for --setting shift")
    start = time.time()
    from runtime.config import load_config

    pipeline = stage = SETTINGS[args.setting]
    preset = load_config(args.config, args.extra)
    max_steps = getattr(preset, stage).max_steps
    taus = None if args.tau_vision is None else {"vision": args.tau_vision, "language": args.tau_language}
    tau_origin = "given" if taus else f"calibrated from the first baseline's curves at {args.calibrate_at:.0%} of " \
        "training: per group, the median change over its matrices"
    tasks = args.target_tasks if args.setting == "shift" else list(preset.data.tasks)
    off, on, items, sources = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp).resolve()
        for seed in args.seeds:  # the two arms side by side per seed, same machine state
            source = args.source
            if args.setting == "shift" and source is None:
                source, record = trained_checkpoint(args, seed, work)
                sources.append(record)
            common = arm_overrides(args.setting, seed, args.extra, tasks, args.test_size, source)
            observe = grades_overrides(stage, 0, 0, args.alpha, args.compute_interval)
            result = run(args.config, common + observe, pipeline, work)
            off.append(arm_row(result, stage, seed, "baseline", observe))
            if taus is None:
                at = args.calibrate_at * max_steps
                taus = calibrate(json.loads((stage_dir(result, stage) / "grades_history.json").read_text()), at)
                print(f"calibrated tau: {taus}", flush=True)
            arm = grades_overrides(stage, taus["vision"], taus["language"], args.alpha, args.compute_interval)
            result_on = run(args.config, common + arm, pipeline, work)
            on.append(arm_row(result_on, stage, seed, "grades", arm))
            try:  # same items for both arms: checked item by item
                items.append(item_deltas(eval_items(result, stage), eval_items(result_on, stage)) or None)
            except (ValueError, KeyError, OSError) as exc:
                print(f"seed {seed}: no per-item pairing ({exc}); the interval falls back to the seed pairs")
                items.append(None)
            for row in (off[-1], on[-1]):
                print(f"seed {seed} {row['arm']:8}: {stage} {row['stage_wall_seconds']:.1f} s, {row['steps']:.0f} "
                      f"steps, frozen {row['frozen_fraction']:.2f}, mean accuracy "
                      f"{row['metrics']['eval/mean_accuracy']:.4f}", flush=True)
    if not args.work:
        for row in off + on:
            row.pop("run_dir")
    command = "unshare --net sh -c 'ip link set lo up; exec .venv/bin/python benchmarks/grades.py " + \
        " ".join(sys.argv[1:]) + "'"
    context = {"command": command, "kind": args.setting, "description": DESCRIPTIONS[args.setting].format(
                   src="+".join(args.source_tasks) if not args.source else args.source, dst="+".join(tasks)),
               "grades_settings": grades_overrides(stage, taus["vision"], taus["language"], args.alpha,
                                                   args.compute_interval),
               "tau_origin": tau_origin, "calibrate_at": args.calibrate_at, "extra": args.extra,
               "tasks": tasks, "test_size": args.test_size, "max_steps": max_steps, "kept_runs": bool(args.work),
               "source": args.source, "source_tasks": args.source_tasks if args.setting == "shift" else None,
               "source_runs": sources}
    summary = summarize(args.name, stage, off, on, items, context) | {"total_seconds": time.time() - start}
    write_report(summary, Path(args.results))
    print(markdown(summary, None))


if __name__ == "__main__":
    main()
