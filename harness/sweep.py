"""Ray Tune sweeps: each trial runs the pipeline with sampled overrides and is scored by its eval stage.

Stages that no swept key touches (data, model, and e.g. the SFT checkpoint a DPO sweep starts from) run once,
before the trials, and every trial reuses them from the stage cache. MLflow: one parent run for the sweep; each
trial's pipeline run is its child (with the trial's stage runs below it).

A sweep of one training stage's GradES settings (`<stage>.grades.*` only) also runs a reference first: the same
pipeline with GradES observing (both taus 0: nothing freezes, same max_steps). Each trial then gets its speed-up
(reference stage wall / trial stage wall) and accuracy delta (trial - reference, on the objective's metric);
sweep.json records them with the Pareto front and the pick (the fastest trial within ACCURACY_TOLERANCE of the
reference), pareto.png plots them. Those trials run one at a time, so their stage walls compare.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import yaml
from pydantic import ValidationError

from evals.registry import TASKS
from harness.inputs import check_inputs, fit_run
from harness.leaderboard import pareto_front
from harness.pipeline import new_run_id, run_pipeline
from harness.report import stage_record
from harness.storage import is_remote
from runtime.atomic import atomic_write
from runtime.config import PipelineConfig, config_values, format_errors, merge, parse_overrides
from runtime.errors import UserError
from runtime.raytrain import ensure_ray
from runtime.records import read_result
from runtime.tracking import Tracker
from stages import STAGES

_TERM = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*(\w+)\((.*)\)\s*$")
SAMPLERS = {"loguniform": 2, "uniform": 2, "randint": 2, "choice": None, "grid": None}


def _value(text: str):
    """A YAML scalar; also reads '1e-4' as a number (YAML 1.1 would keep it a string)."""
    value = yaml.safe_load(text.strip())
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_space(terms: list[str]) -> dict[str, tuple[str, list]]:
    """'dpo.beta=loguniform(0.01,1)' -> {'dpo.beta': ('loguniform', [0.01, 1.0])}; UserError names a bad term."""
    space = {}
    for term in terms:
        m = _TERM.match(term)
        if not m:
            raise UserError(f"--space '{term}': expected key=sampler(args), e.g. dpo.beta=loguniform(0.01,1)")
        key, sampler, args = m.group(1), m.group(2), [a for a in m.group(3).split(",") if a.strip()]
        if sampler not in SAMPLERS:
            raise UserError(f"--space '{term}': unknown sampler '{sampler}' (use {', '.join(SAMPLERS)})")
        want = SAMPLERS[sampler]
        if (want is not None and len(args) != want) or not args:
            raise UserError(f"--space '{term}': {sampler} takes {want or 'one or more'} arguments")
        try:
            values = [_value(a) for a in args]
        except yaml.YAMLError:
            raise UserError(f"--space '{term}': every value must be a number or a word") from None
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise UserError(f"--space '{term}': every value must be a finite number or a word (no nan, no inf)")
        if sampler in ("loguniform", "uniform", "randint"):
            if not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                raise UserError(f"--space '{term}': {sampler} needs two numbers, low < high")
            if sampler == "loguniform" and values[0] <= 0:
                raise UserError(f"--space '{term}': loguniform needs a positive lower bound")
            if sampler == "randint" and not all(float(v).is_integer() for v in values):
                raise UserError(f"--space '{term}': randint takes whole numbers (use uniform for a range of reals)")
        space[key] = (sampler, values)
    return space


def to_tune(space: dict[str, tuple[str, list]]) -> dict:
    from ray import tune

    make = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
            "randint": lambda v: tune.randint(*v), "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[sampler](values) for key, (sampler, values) in space.items()}


def log_grid(low: float, high: float, n: int) -> list[float]:
    if n == 1:
        return [low]
    return [float(f"{low * (high / low) ** (i / (n - 1)):.4g}") for i in range(n)]


def grades_space(stage: str, low: float, high: float):
    """A GradES search space over ``stage``'s taus (log-uniform in [low, high]), grace period and check interval."""
    return lambda n: {f"{stage}.grades.vision_tau": ("loguniform", [low, high]),
                      f"{stage}.grades.language_tau": ("loguniform", [low, high]),
                      f"{stage}.grades.alpha": ("uniform", [0.1, 0.6]),
                      f"{stage}.grades.compute_interval": ("choice", [10, 20, 40])}


DEFAULT_OBJECTIVE = "eval/mean_accuracy"


class Preset(NamedTuple):
    pipeline: str
    fixed: list[str]  # overrides every trial runs with
    space: Callable[[int], dict]  # the number of trials -> the search space
    objective: str = DEFAULT_OBJECTIVE  # unless --objective is given


# A GradES sweep trades accuracy against what the stage costs: its trials are scored by accuracy gained per dollar
# (the pick, in sweep.json's grades block, is the cheapest trial within ACCURACY_TOLERANCE of the reference).
COST_AWARE = "gain_per_usd:eval/mean_accuracy"
PRESETS = {
    "dpo-beta": Preset("dpo", [], lambda n: {"dpo.beta": ("grid", log_grid(0.01, 1.0, n))}),
    "grades": Preset("sft", ["sft.grades.enabled=true"], grades_space("sft", 1.0, 100.0), COST_AWARE),
    # the default DPO's per-check L1 changes run from ~0.1-7 (smallest matrix) to ~1-120 (largest) as its learning
    # rate decays: the range spans freezing nothing early to freezing everything at the end of the grace period
    "grades-dpo": Preset("dpo", ["dpo.grades.enabled=true"], grades_space("dpo", 3.0, 150.0), COST_AWARE),
}
ACCURACY_TOLERANCE = 0.01  # the GradES pick: the fastest trial whose accuracy is at most this much below the reference


class SweepRequest(NamedTuple):
    """What `harness sweep` was asked for, with its preset resolved."""
    pipeline: str
    fixed: list[str]  # overrides every trial runs with
    space: dict[str, tuple[str, list]]
    objective: str


def request(preset: str | None, overrides: list[str], space: list[str], pipeline: str | None, trials: int,
            objective: str | None, mode: str, scheduler: str | None) -> SweepRequest:
    """The sweep a command line asks for: the preset's pipeline, fixed overrides, space and objective, with
    ``--space`` terms laid over the preset's (raises UserError)."""
    fixed = list(overrides)
    if preset is not None and "=" in preset:  # no preset: the first word is already an override
        fixed, preset = [preset, *fixed], None
    if scheduler not in (None, "asha"):
        raise UserError(f"--scheduler must be asha (got {scheduler!r})")
    if mode not in ("max", "min"):
        raise UserError(f"--mode must be max or min (got {mode!r})")
    if preset is None:
        if not space:
            raise UserError(f"give a preset ({', '.join(PRESETS)}) or at least one --space")
        return SweepRequest(pipeline or "sft", fixed, parse_space(space), objective or DEFAULT_OBJECTIVE)
    if preset not in PRESETS:
        raise UserError(f"unknown sweep preset '{preset}' (known: {', '.join(PRESETS)})")
    chosen = PRESETS[preset]
    return SweepRequest(pipeline or chosen.pipeline, chosen.fixed + fixed, chosen.space(trials) | parse_space(space),
                        objective or chosen.objective)


def shared_prefix(stage_names: list[str], swept: list[str]) -> list[str]:
    """The leading stages whose cache keys no swept key can change."""
    prefix = []
    for name in stage_names:
        keys = STAGES[name].CONFIG_KEYS
        if any(s == k or s.startswith(k + ".") or k.startswith(s + ".") for s in swept for k in keys):
            break
        prefix.append(name)
    return prefix


def objective_metric(objective: str) -> str:
    """The eval metric an objective is made of (`gain_per_usd:<metric>`: that metric)."""
    return objective.removeprefix("gain_per_usd:")


def objective_value(metrics: dict, cost: float, objective: str) -> float:
    """An eval metric, or `gain_per_usd:<metric>` = (metric - base metric) / USD."""
    if objective.startswith("gain_per_usd:"):
        metric = objective_metric(objective)
        base = metrics.get(metric.replace("eval/", "eval/base_"), 0.0)
        return (metrics[metric] - base) / cost if cost > 0 else math.inf
    return metrics[objective]


def grades_stage(space: dict) -> str | None:
    """The training stage whose GradES settings are the only swept keys (`<stage>.grades.*`), or None."""
    stages = {key.split(".")[0] for key in space}
    if len(stages) == 1 and all(key.split(".")[1:2] == ["grades"] for key in space):
        return stages.pop()
    return None


def stage_view(result: dict, stage: str, metric: str) -> dict:
    """From a pipeline result: the stage's wall time, optimizer steps and final frozen fraction, and ``metric``."""
    record, m = stage_record(result, stage), result["metrics"]
    return {"stage_wall_seconds": record["wall_seconds"], "steps": m.get(f"{stage}/steps"),
            "frozen_fraction": m.get(f"{stage}/grades/frozen_fraction", 0.0), "metric": m.get(metric)}


def grades_pick(rows: list[dict], tolerance: float = ACCURACY_TOLERANCE) -> dict | None:
    """The fastest finished trial whose accuracy delta is >= -tolerance (None if there is none)."""
    ok = [r for r in rows if r.get("grades") and r["grades"]["accuracy_delta"] >= -tolerance]
    return max(ok, key=lambda r: r["grades"]["speedup"]) if ok else None


def plot_pareto(rows: list[dict], stage: str, metric: str, path: Path):
    """Speed-up vs accuracy delta per trial against the reference (at 1x, 0), the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("grades")]
    points = [(r["grades"]["speedup"], r["grades"]["accuracy_delta"]) for r in done]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([s for s, _ in points], [d for _, d in points], color="tab:blue", label="trial")
    front = sorted(p for p, on in zip(points, pareto_front(points), strict=True) if on)
    if front:
        ax.plot(*zip(*front, strict=True), color="tab:blue", lw=1, label="Pareto front")
    ax.scatter([1.0], [0.0], marker="s", color="black", label="reference (GradES observing)")
    ax.axhline(-ACCURACY_TOLERANCE, color="red", ls="--", lw=0.8, label=f"delta = -{ACCURACY_TOLERANCE}")
    pick = grades_pick(done)
    if pick:
        ax.scatter([pick["grades"]["speedup"]], [pick["grades"]["accuracy_delta"]], s=120, facecolors="none",
                   edgecolors="red", label="pick")
    ax.set_xlabel(f"speed-up of the {stage} stage (reference wall / trial wall)")
    ax.set_ylabel(f"{metric} - reference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


class TrialFailed(RuntimeError):
    """A trial's failure, summarised on one line for sweep.json."""


def _error_line(error: BaseException) -> str:
    text = str(error)
    marker = "TrialFailed: "
    if marker in text:
        return text[text.rindex(marker) + len(marker):].splitlines()[0][:500]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else type(error).__name__


def trial(params: dict, *, resolved: dict, overrides: list[str], pipeline: str, root: str, sweep_run_id: str,
          objective: str) -> None:
    """One Tune trial: the pipeline with this trial's overrides (shared stages come from the cache)."""
    from ray import tune  # in the trial's own process, started by Tune

    trial_overrides = overrides + [f"{k}={v}" for k, v in params.items()]
    tree = merge(resolved, parse_overrides(trial_overrides))
    tree["run_name"] = f"trial-{tune.get_context().get_trial_id()}"
    try:
        cfg = PipelineConfig.model_validate(tree)
        result = run_pipeline(cfg, pipeline, root, parent_run_id=sweep_run_id)
    except ValidationError as exc:
        raise TrialFailed(" ".join(format_errors(exc, "trial config").split())) from None
    except Exception as exc:
        raise TrialFailed(f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]) from exc
    metrics = dict(result["metrics"])
    tune.report({"objective": objective_value(metrics, result["cost_usd"], objective), "cost_usd": result["cost_usd"],
                 "cost_usd_this_run": result["cost_usd_this_run"], "run_dir": result["run_dir"],
                 **{k: v for k, v in metrics.items() if k.startswith("eval/")}})


def plot(trials: list[dict], keys: list[str], objective: str, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if t["status"] == "TERMINATED" and t.get("objective") is not None]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4 * (len(keys) + 1), 3.6))
    for ax, key in zip(axes, keys, strict=False):
        xs = [t["params"][key] for t in done]
        ax.scatter(xs, [t["objective"] for t in done])
        if all(isinstance(x, (int, float)) and x > 0 for x in xs) and len(xs) > 1 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
    axes[-1].scatter([t["cost_usd"] for t in done], [t["objective"] for t in done], color="tab:orange")
    axes[-1].set_xlabel("cost (USD)")
    axes[-1].set_ylabel(objective)
    axes[-1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def sweep_base(cfg, fixed: list[str], space: dict[str, tuple[str, list]]) -> tuple[PipelineConfig, str | None]:
    """The config every trial starts from (``fixed`` laid over ``cfg``; GradES on for a GradES sweep, whose stage is
    returned too), with the tracking store this process resolved pinned (trials run in other processes, elsewhere).
    Every swept key must exist in it (raises UserError)."""
    resolved = cfg.model_dump(mode="json")
    resolved["tracking"]["uri"] = cfg.tracking.resolved_uri()
    stage = grades_stage(space)
    if stage:
        fixed = [*fixed, f"{stage}.grades.enabled=true"]
    base = PipelineConfig.model_validate(merge(resolved, parse_overrides(fixed)))
    tree = base.model_dump()
    for key in space:
        node = tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise UserError(f"--space: unknown config key '{key}'")
            node = node[part]
    return base, stage


MAX_CHECKED_COMBINATIONS = 256  # more than this: each key's values are checked alone (the others at the base's)


def space_extremes(sampler: str, values: list) -> list:
    """The values that bound what ``sampler`` can draw: each value of a grid or choice; both ends of a range (Tune's
    randint excludes its upper end), and for a continuous range one inner, non-integer point, so that a float range
    over an integer key is refused too. Every schema constraint is an interval or a type, so passing these means
    every draw passes."""
    if sampler in ("grid", "choice"):
        return list(values)
    low, high = values
    if sampler == "randint":
        return [int(low), int(high) - 1] if int(high) - 1 > int(low) else [int(low)]
    inner = low * (high / low) ** 0.381966 if sampler == "loguniform" else low + (high - low) * 0.381966
    return [low, float(f"{inner:.6g}") if inner != int(inner) else inner + 0.5 * (high - inner), high]


def check_space(base: PipelineConfig, trial_stages: list[str], space: dict[str, tuple[str, list]]) -> None:
    """Pre-flight of the trials' configs, before any directory, store or Ray process exists: every value a trial can
    draw (``space_extremes``) laid over ``base`` passes the config schema, in every combination (or key by key where
    the combinations exceed MAX_CHECKED_COMBINATIONS), and the own check of each of ``trial_stages`` (the stages after
    the shared prefix: those are checked by their one run). Raises UserError naming the values."""
    import itertools

    tree = base.model_dump(mode="json")
    points = {key: space_extremes(sampler, values) for key, (sampler, values) in space.items()}
    if math.prod(len(v) for v in points.values()) <= MAX_CHECKED_COMBINATIONS:
        combos = [dict(zip(points, combo, strict=True)) for combo in itertools.product(*points.values())]
    else:
        combos = [{key: value} for key, values in points.items() for value in values]
    checked: set[str] = set()  # (stage, the config values its result depends on): a stage's check runs once for each
    for combo in combos:
        assigned = ", ".join(f"{k}={v}" for k, v in combo.items())
        trial_tree = merge(tree, parse_overrides([f"{k}={v}" for k, v in combo.items()]))
        try:
            cfg = PipelineConfig.model_validate(trial_tree)
        except ValidationError as exc:
            raise UserError(format_errors(exc, f"--space, a trial with {assigned}",
                                          fix="narrow the --space range to values the config allows")) from None
        for name in trial_stages:
            seen = json.dumps([name, *(config_values(trial_tree, k) for k in STAGES[name].CONFIG_KEYS)],
                              sort_keys=True, default=str)
            if seen in checked:
                continue
            checked.add(seen)
            try:
                STAGES[name].check(cfg)
            except UserError as exc:
                raise UserError(f"--space, a trial with {assigned}: {exc}") from None


def check_objective(base: PipelineConfig, pipeline: str, objective: str) -> None:
    """The objective names a metric the pipeline's eval stage writes: ``eval/`` + an optional checkpoint or prior
    prefix + ``mean_accuracy`` or an enabled task's metric (with an interval end, a subset or a question type)."""
    stages = base.stages_of(pipeline)
    if "eval" not in stages:
        raise UserError(f"harness sweep: pipeline '{pipeline}' ({' -> '.join(stages)}) has no eval stage to score "
                        "the trials; sweep a pipeline that ends in eval")
    metrics = ["mean_accuracy", *(TASKS[name].metric for name, spec in base.data.tasks.items() if spec is not None)]
    prefixes = ["", "prior_", "base_", *(f"{s}_" for s in stages)]
    metric_name = objective_metric(objective)
    name = metric_name.removeprefix("eval/")
    known = metric_name.startswith("eval/") and any(
        name.removeprefix(prefix) == metric or name.removeprefix(prefix).startswith((f"{metric}_", f"{metric}/"))
        for prefix in prefixes for metric in metrics)
    if not known:
        raise UserError(f"--objective '{objective}': not a metric this pipeline's eval writes; use eval/<metric> or "
                        f"gain_per_usd:eval/<metric>, <metric> one of {', '.join(metrics)}")


def sweep_root(output_dir: str | None, cfg) -> Path:
    if is_remote(output_dir or cfg.output_dir):  # Tune's trials and sweep.json are written to local paths
        raise UserError("harness sweep: --output-dir must be a local directory; object storage (s3://, gs://) is "
                        "for `harness run`")
    return Path(output_dir or cfg.output_dir).expanduser().resolve()


def run_shared(base: PipelineConfig, prefix: list[str], root: Path, console, parent: str) -> float:
    """The stages no swept key touches, once (the trials reuse them from the cache); what they cost."""
    if not prefix:
        return 0.0
    shared = base.model_copy(update={"pipelines": {**base.pipelines, "_shared": prefix}})
    return run_pipeline(shared, "_shared", str(root), console=console, parent_run_id=parent)["cost_usd_this_run"]


def run_reference(base: PipelineConfig, stage: str, pipeline: str, metric: str, root: Path, console, parent: str,
                  sweep_id: str) -> dict:
    """A GradES sweep's reference: the pipeline with GradES observing (both taus 0), against which every trial's
    speed-up and accuracy delta are measured."""
    ref_cfg = PipelineConfig.model_validate(merge(base.model_dump(mode="json"), parse_overrides([
        f"{stage}.grades.enabled=true", f"{stage}.grades.vision_tau=0", f"{stage}.grades.language_tau=0",
        f"run_name={sweep_id}-reference"])))
    ref = run_pipeline(ref_cfg, pipeline, str(root), console=console, parent_run_id=parent)
    return stage_view(ref, stage, metric) | {"run_dir": ref["run_dir"], "cost_usd_this_run": ref["cost_usd_this_run"]}


def run_trials(base: PipelineConfig, pipeline: str, space: dict, trials: int, objective: str, scheduler: str | None,
               root: Path, parent: str, sweep_id: str, timed: bool) -> list[dict]:
    """The trials through Ray Tune; one row each (params, status, error, objective, cost, eval metrics, run dir).
    ``timed`` trials (their stage walls are compared) run one at a time."""
    import ray  # Ray Tune (~2 s of imports): when trials run, not for the CLI's parsing of a space
    from ray import tune

    grid = all(sampler == "grid" for sampler, _ in space.values())
    trainable = tune.with_parameters(trial, resolved=base.model_dump(mode="json"), overrides=[], pipeline=pipeline,
                                     root=str(root), sweep_run_id=parent, objective=objective)
    sched = None
    if scheduler == "asha":  # fed by the training loss each trial reports at every checkpoint
        from ray.tune.schedulers import ASHAScheduler

        sched = ASHAScheduler(metric="loss", mode="min", time_attr="training_iteration", grace_period=1)
    # A trial's driver holds no CPU (its training workers ask Ray for theirs); a non-empty request is still needed,
    # so it asks for a little memory. Trials at once: as many as training can run side by side.
    res, have = base.resources, ray.cluster_resources()
    fits = [have.get("CPU", 1) // (res.workers * res.cpus_per_worker)]
    if res.use_gpu:
        fits.append(have.get("GPU", 0) // (res.workers * res.gpus_per_worker))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0, "memory": 64 * 1024**2}),
        param_space=to_tune(space),
        # the best trial is chosen below from the final eval reports; the scheduler has its own metric
        tune_config=tune.TuneConfig(num_samples=1 if grid else trials, scheduler=sched,
                                    max_concurrent_trials=1 if timed else max(1, int(min(fits)))),
        run_config=tune.RunConfig(name=sweep_id, storage_path=str(root / ".tune"), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    rows = []
    for result in tuner.fit():
        metrics = result.metrics or {}
        status = "ERROR" if result.error else ("TERMINATED" if "objective" in metrics else "STOPPED")
        rows.append({"params": {k: result.config.get(k) for k in space}, "status": status,
                     "error": _error_line(result.error) if result.error else None,
                     "objective": metrics.get("objective"), "cost_usd": metrics.get("cost_usd", 0.0),
                     "cost_usd_this_run": metrics.get("cost_usd_this_run", 0.0),
                     "metrics": {k: v for k, v in metrics.items() if k.startswith("eval/")},
                     "run_dir": metrics.get("run_dir")})
    return rows


def compare_with_reference(rows: list[dict], reference: dict, stage: str, metric: str) -> None:
    """Each finished trial's GradES view: its stage wall, steps and frozen fraction, speed-up and accuracy delta."""
    for r in rows:
        done = r["run_dir"] and (Path(r["run_dir"]) / "result.json").is_file()
        view = done and stage_view(read_result(Path(r["run_dir"]) / "result.json"), stage, metric)
        if r["status"] == "TERMINATED" and view and None not in (view["metric"], reference["metric"]):
            r["grades"] = view | {"speedup": reference["stage_wall_seconds"] / view["stage_wall_seconds"],
                                  "accuracy_delta": view["metric"] - reference["metric"]}


def grades_record(rows: list[dict], reference: dict, stage: str, metric: str) -> dict:
    """sweep.json's GradES block: the reference, the Pareto front of (speed-up, accuracy delta), the pick."""
    graded = [r for r in rows if r.get("grades")]
    front = pareto_front([(r["grades"]["speedup"], r["grades"]["accuracy_delta"]) for r in graded])
    pick = grades_pick(graded)
    return {"stage": stage, "metric": metric, "reference": reference, "accuracy_tolerance": ACCURACY_TOLERANCE,
            "pareto": [r["params"] for r, on in zip(graded, front, strict=True) if on],
            "pick": pick and {"params": pick["params"], **pick["grades"]},
            "pick_overrides": [f"{k}={v}" for k, v in pick["params"].items()] if pick else []}


def log_sweep(tracker: Tracker, parent: str, sweep: dict, sweep_dir: Path, space: dict, ok: int) -> None:
    """sweep.json, its plots, and the best trial into the sweep's MLflow run."""
    rows, best = sweep["trials"], sweep["best"]
    atomic_write(sweep_dir / "sweep.json", json.dumps(sweep, indent=2, default=str))
    tracker.log_figure(parent, plot(rows, list(space), sweep["objective"], sweep_dir / "sweep.png"), "sweep.png")
    if "grades" in sweep:
        grades = sweep["grades"]
        fig = plot_pareto(rows, grades["stage"], grades["metric"], sweep_dir / "pareto.png")
        tracker.log_figure(parent, fig, "pareto.png")
    tracker.log_artifact(parent, str(sweep_dir / "sweep.json"))
    if best:
        tracker.log_params(parent, {f"best.{k}": v for k, v in best["params"].items()})
        tracker.log_metrics(parent, {"best/objective": best["objective"],
                                     **{f"best/{k}": v for k, v in best["metrics"].items()}})
    tracker.log_metrics(parent, {"cost/usd": sweep["cost_usd"], "trials/failed": float(len(rows) - ok)})


def preflight(base: PipelineConfig, prefix: list[str], stages: list[str], console=None) -> None:
    """What a run of the pipeline checks before its first stage (harness.pipeline.run_pipeline), for the sweep as a
    whole, before its directory, MLflow run or Ray exist: the shared stages' own checks (check_space did the trials'),
    room for the workers, prices, local data sources, and that the stages fit the device at some batch size."""
    for name in prefix:
        STAGES[name].check(base)
    say = console.print if console else print
    check_inputs(base, stages, say=say)
    fit_run(base, stages, say=lambda _: None)  # its choices are each run's own; here only whether any fits


def run_sweep(cfg, pipeline: str, fixed: list[str], space: dict[str, tuple[str, list]], trials: int,
              objective: str, mode: str, output_dir: str | None, console=None, scheduler: str | None = None) -> dict:
    """Run the sweep; write and return sweep.json's content."""
    base, stage = sweep_base(cfg, fixed, space)
    check_objective(base, pipeline, objective)
    stages = base.stages_of(pipeline)
    prefix = shared_prefix(stages, list(space))
    check_space(base, stages[len(prefix):], space)
    preflight(base, prefix, stages, console)
    root = sweep_root(output_dir, cfg)
    sweep_id = new_run_id(f"sweep-{pipeline}")
    sweep_dir = root / sweep_id
    sweep_dir.mkdir(parents=True)
    tracker = Tracker(cfg.tracking.resolved_uri(), cfg.tracking.experiment)
    tracker.reap_stale(say=console.print if console else None)  # runs of processes that stopped, on any host
    parent = tracker.start(sweep_id, tags={"vlmlab.kind": "sweep", "vlmlab.sweep_pipeline": pipeline})
    with tracker.closing_on_error():
        tracker.log_params(parent, {"space": json.dumps(space), "trials": trials, "objective": objective,
                                    "shared_stages": ",".join(prefix)})
        ensure_ray(base.ray.dashboard)
        shared_cost = run_shared(base, prefix, root, console, parent)
        metric = objective_metric(objective)
        reference = stage and run_reference(base, stage, pipeline, metric, root, console, parent, sweep_id)
        rows = run_trials(base, pipeline, space, trials, objective, scheduler, root, parent, sweep_id,
                          timed=bool(reference))
        if reference:
            compare_with_reference(rows, reference, stage, metric)
        ok = [r for r in rows if r["status"] == "TERMINATED" and r["objective"] is not None]
        ok.sort(key=lambda r: r["objective"], reverse=(mode == "max"))
        sign = -1 if mode == "max" else 1
        rows.sort(key=lambda r: (r["objective"] is None, sign * (r["objective"] or 0)))
        sweep = {"sweep_id": sweep_id, "pipeline": pipeline, "objective": objective, "mode": mode,
                 "space": {k: {"sampler": s, "args": v} for k, (s, v) in space.items()}, "shared_stages": prefix,
                 "trials": rows, "best": ok[0] if ok else None,
                 # what the sweep spent: the shared stages once, plus each trial's own stages
                 "cost_usd": shared_cost + sum(r["cost_usd_this_run"] or 0.0 for r in rows)
                 + (reference["cost_usd_this_run"] if reference else 0.0),
                 "mlflow_run_id": parent}
        if reference:
            sweep["grades"] = grades_record(rows, reference, stage, metric)
        log_sweep(tracker, parent, sweep, sweep_dir, space, len(ok))
        tracker.end(parent, "FINISHED")
    return sweep | {"sweep_dir": str(sweep_dir)}
