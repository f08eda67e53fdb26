"""`harness runs` (recent runs) and `harness report RUN` (one run's figures in a self-contained HTML file).

Sources: the run directory's `result.json` (per-stage cost, per-question-type accuracy), the MLflow metric history
of each training stage's child run (loss, DPO rewards, GRPO rewards, GradES frozen fraction; a stage reused from
the cache is read from the run that computed it), and a stage's `grades_history.json` when MLflow has no GradES
curve. The report is `<run dir>/report/report.html` with the same figures as PNG files beside it, and is logged
as the `report/` artifact of the run's parent MLflow run.
"""
from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from evals import registry
from runtime.config import TrackingConfig
from runtime.cost import BUSY_PHASES, PHASES
from runtime.errors import UserError
from runtime.records import checkpoint_rows, read_grades_history, read_result
from runtime.secrets import redact_text
from runtime.tracking import cost_view_url, publish_cost_view, store_exists

METRIC_TITLES = {t.metric: f"{t.title} ({t.metric})" for t in registry.TASKS.values()}  # a task metric -> its title


# -- finding runs ----------------------------------------------------------------------------------------------

def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _parents(client, experiment: str, max_results: int = 1000) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`vlmlab.pipeline` != ''", max_results=max_results,
                              order_by=["attributes.start_time DESC"])


def recent_runs(uri: str | None, experiment: str, output_dir: str, limit: int = 20) -> list[dict]:
    """Newest first: the pipeline runs in MLflow, plus run directories under ``output_dir`` that MLflow lacks."""
    rows: dict[str, dict] = {}
    if uri:  # None: no store to read
        for run in _parents(_client(uri), experiment):  # newest first: a resumed run's latest attempt wins
            m = run.data.metrics
            rows.setdefault(run.info.run_name, {
                "run": run.info.run_name, "pipeline": run.data.tags["vlmlab.pipeline"],
                "status": run.info.status.lower(), "started": run.info.start_time / 1000,
                "accuracy": m.get("eval/mean_accuracy"), "ci_low": m.get("eval/mean_accuracy_ci_low"),
                "ci_high": m.get("eval/mean_accuracy_ci_high"), "usd": m.get("cost/usd"),
                "run_dir": run.data.tags.get("vlmlab.run_dir")})
    root = Path(output_dir)
    for run_dir in (p for p in root.glob("*/config.yaml") if p.parent.name not in rows):
        run_dir = run_dir.parent
        result = _read_result(run_dir)
        m = result.get("metrics", {})
        rows[run_dir.name] = {
            "run": run_dir.name, "pipeline": result.get("pipeline") or _pipeline_of(run_dir.name),
            "status": "finished" if result else "incomplete", "started": run_dir.stat().st_mtime,
            "accuracy": m.get("eval/mean_accuracy"), "ci_low": m.get("eval/mean_accuracy_ci_low"),
            "ci_high": m.get("eval/mean_accuracy_ci_high"), "usd": result.get("cost_usd"),
            "run_dir": str(run_dir)}
    return sorted(rows.values(), key=lambda r: -r["started"])[:limit]


def _pipeline_of(run_id: str) -> str:
    """The pipeline in a generated run id (`<date>-<time>-<pipeline>-<hex>`); '?' for a chosen run_name."""
    found = re.fullmatch(r"\d{8}-\d{6}-(.+)-[0-9a-f]{6}", run_id)
    return found.group(1) if found else "?"


RUNS_FOOTER = ("mean acc: eval/mean_accuracy, the mean of the tasks' metrics, ± half its 95 % interval; USD: what the "
               "run cost. `harness report RUN` draws a run's figures.")


def runs_table(rows: list[dict]):
    """The `harness runs` table: fits 80 columns."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("run", "pipe", "status", "mean acc (95% CI)", "USD"):
        table.add_column(col, justify="left" if col in ("run", "pipe", "status") else "right", no_wrap=col != "run",
                         overflow="fold")  # a long run name folds onto a second line: it is an id to copy
    for r in rows:
        acc = _num(r["accuracy"], ".3f")
        if acc and r["ci_low"] is not None and r["ci_high"] is not None:
            acc += f" ±{(r['ci_high'] - r['ci_low']) / 2:.3f}"
        table.add_row(r["run"], r["pipeline"], r["status"], acc, _num(r["usd"], ".3g"))
    return table


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _read_result(run_dir: Path) -> dict:
    """The run's result.json, checked (runtime.records); {} for a run that has not finished."""
    path = run_dir / "result.json"
    return read_result(path, "delete or repair the run directory's result.json") if path.exists() else {}


@dataclass
class Run:
    run_dir: Path
    result: dict
    mlflow_run_id: str | None = None
    client: object = None
    notes: list[str] = field(default_factory=list)


def resolve(target: str, tracking_uri: str | None, experiment: str | None, output_dir: str) -> Run:
    """A run directory (or its result.json), a run id under ``output_dir``, or a run id/name in MLflow. The store
    and experiment default to the run's own (its config's tracking section)."""

    dirs = [p.parent if p.name == "result.json" else p for p in (Path(target), Path(output_dir) / target)]
    run_dir = next((p for p in dirs if (p / "result.json").exists()), None)
    recorded = _read_result(run_dir).get("config", {}).get("tracking", {}) if run_dir else {}
    uri = TrackingConfig(uri=tracking_uri or recorded.get("uri")).resolved_uri()
    experiment = experiment or recorded.get("experiment") or "vlmlab"
    client, parent = None, None
    if store_exists(uri):
        try:
            client = _client(uri)
            parent = _find_parent(client, experiment, run_dir.name if run_dir else target)
        except Exception:  # an unreachable store: the report is made from result.json alone
            client = None
    if run_dir is None and parent is not None and parent.data.tags.get("vlmlab.run_dir"):
        run_dir = Path(parent.data.tags["vlmlab.run_dir"])
    if run_dir is None or not (run_dir / "result.json").exists():
        where = f" (MLflow knows it: its directory {run_dir} has no result.json; did it finish?)" if parent else ""
        raise UserError(f"no finished run '{target}': give a run directory, or a run id under {output_dir}/ or in "
                        f"MLflow experiment '{experiment}' at {uri}{where}; `harness runs` lists them")
    run = Run(run_dir, _read_result(run_dir), parent.info.run_id if parent else None, client)
    if parent is None:
        run.notes.append(f"MLflow at {uri} has no record of this run: its training curves are left out")
    return run


def _find_parent(client, experiment: str, name: str):
    """The pipeline run named ``name`` (newest), or whose MLflow run id is ``name``."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None or "'" in name:
        return None
    for attr in ("run_name", "run_id"):
        query = f"attributes.{attr} = '{name}' and tags.`vlmlab.pipeline` != ''"
        found = client.search_runs([exp.experiment_id], query, max_results=1,
                                   order_by=["attributes.start_time DESC"])
        if found:
            return found[0]
    return None


# -- what the figures show -------------------------------------------------------------------------------------

def _stage_source(run: Run, record: dict):
    """The MLflow run that computed ``record``'s stage: this run's child, or for a cached stage the child run of
    the run that computed it (same stage key, not itself reused)."""
    client = run.client
    if record.get("reused_from") and record.get("key"):  # the cache is shared by every experiment
        experiments = [e.experiment_id for e in client.search_experiments()]
        query = f"tags.`vlmlab.key` = '{record['key']}' and tags.`vlmlab.reused` = 'False'"
    else:
        experiments = [client.get_run(run.mlflow_run_id).info.experiment_id]
        query = f"tags.`mlflow.parentRunId` = '{run.mlflow_run_id}' and tags.`vlmlab.stage` = '{record['name']}'"
    found = client.search_runs(experiments, query, max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def curves(run: Run) -> dict[str, dict[str, tuple[list, list]]]:
    """Per training stage: step-logged metric name (without the stage prefix) -> (steps, values)."""
    out: dict[str, dict] = {}
    if run.client is None or run.mlflow_run_id is None:
        return out
    for record in run.result["stages"]:
        name = record["name"]
        if f"{name}/steps" not in record["metrics"]:
            continue  # not a training stage
        try:
            source = _stage_source(run, record)
        except Exception as exc:  # an unreachable or damaged store, a result.json's key it cannot query: no curves
            run.notes.append(f"{name}: its training curves could not be read from MLflow ({type(exc).__name__})")
            continue
        if source is None:
            run.notes.append(f"{name}: no MLflow run holds its training curves")
            continue
        series = {}
        for key in source.data.metrics:
            if key.startswith(f"{name}/"):
                # step 0 holds the stage's summary (logged by the pipeline); the trainer logs from step 1 on
                history = sorted((m for m in run.client.get_metric_history(source.info.run_id, key) if m.step > 0),
                                 key=lambda m: m.step)
                if len(history) > 1:
                    series[key[len(name) + 1:]] = ([m.step for m in history], [m.value for m in history])
        out[name] = series
    return out


def grades_curves(run: Run, stage_curves: dict) -> dict[str, dict[str, tuple[list, list]]]:
    """Per stage with GradES on: frozen fraction (all, vision, language) over steps, from MLflow or, failing
    that, the stage's grades_history.json."""
    out = {}
    for record in run.result["stages"]:
        name = record["name"]
        if f"{name}/grades/frozen_fraction" not in record["metrics"]:
            continue
        logged = {k.split("frozen_fraction", 1)[1].lstrip("_") or "all": v
                  for k, v in stage_curves.get(name, {}).items() if k.startswith("grades/frozen_fraction")}
        if not logged:
            path = stage_dir(record, run.run_dir) / "grades_history.json"
            logged = frozen_fractions(read_grades_history(path)) if path.exists() else {}
        if logged:
            out[name] = logged
    return out


def stage_record(result: dict, name: str) -> dict:
    """A result.json's record of stage ``name``."""
    return next(s for s in result["stages"] if s["name"] == name)


def stage_dir(record: dict, run_dir: str | Path) -> Path:
    """Where a stage's files are: under its run, or in the run that computed it when this one reused it."""
    return Path(record.get("reused_from") or Path(run_dir) / record["name"])


def frozen_fractions(history: dict) -> dict[str, tuple[list, list]]:
    """From a grades_history.json: per group (all, vision, language) the checks' steps and the fraction of the
    group's matrices frozen by each."""
    matrices = history.values()
    steps = sorted({step for m in matrices for step, _ in m["changes"]})
    out = {}
    for group in ("all", "vision", "language"):
        members = [m for m in matrices if group in ("all", m["group"])]
        if members:
            out[group] = (steps, [sum(m["frozen_at"] is not None and m["frozen_at"] <= s for m in members)
                                  / len(members) for s in steps])
    return out


def accuracy_table(result: dict) -> dict[str, dict[str, dict[str, float]]]:
    """task metric -> checkpoint (base, each training stage's model; the last is the final one) -> question type
    ('all': the whole task) -> accuracy. The question-only prior comes first, for the whole task only."""
    metrics = result["metrics"]
    eval_record = next((s for s in result["stages"] if s["name"] == "eval"), {})
    labels = eval_record.get("outputs", {}).get("scored") or ["base"]
    out = {}
    for metric in METRIC_TITLES:
        if f"eval/{metric}" not in metrics:
            continue
        table = {}
        if f"eval/prior_{metric}" in metrics:
            table["question-only prior"] = {"all": metrics[f"eval/prior_{metric}"]}
        for i, label in enumerate(labels):
            prefix = f"eval/{metric}" if i == len(labels) - 1 else f"eval/{label}_{metric}"
            if prefix in metrics:
                name = f"{label} (final)" if i == len(labels) - 1 and len(labels) > 1 else label
                table[name] = {"all": metrics[prefix]} | {k[len(prefix) + 1:]: v for k, v in metrics.items()
                                                          if k.startswith(prefix + "/")
                                                          and not k.endswith(("_ci_low", "_ci_high"))}
        out[metric] = table
    return out


# -- figures ---------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, width: float = 4.6, height: float = 3.6):
    """A figure with ``n`` panels, at most three to a row."""
    plt = _plt()
    cols, rows = min(n, 3), -(-n // 3)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _over_steps(ax, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def loss_figure(stage_curves: dict):
    stages = [s for s, c in stage_curves.items() if "loss" in c]
    if not stages:
        return None
    fig, axes = _grid(len(stages))
    for ax, stage in zip(axes, stages, strict=True):
        steps, values = stage_curves[stage]["loss"]
        ax.plot(steps, values, marker="o", ms=3, color="tab:blue")
        _over_steps(ax, f"{stage}: training loss", "loss")
    fig.suptitle("Training loss per stage")
    return fig


def dpo_figure(series: dict):
    if "rewards/margins" not in series and "rewards/accuracies" not in series:
        return None
    fig, axes = _grid(2, width=5.5)
    for ax, key, title, ylabel in ((axes[0], "rewards/margins", "reward margin (chosen - rejected)", "margin"),
                                   (axes[1], "rewards/accuracies", "reward accuracy (chosen > rejected)",
                                    "fraction of pairs")):
        if key in series:
            ax.plot(*series[key], marker="o", ms=3, color="tab:purple", label=key)
        if key == "rewards/margins":
            for side, color in (("chosen", "tab:green"), ("rejected", "tab:red")):
                if f"rewards/{side}" in series:
                    ax.plot(*series[f"rewards/{side}"], lw=1, ls="--", color=color, label=f"rewards/{side}")
            ax.axhline(0, color="grey", lw=0.8)
        else:
            ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
            ax.set_ylim(-0.05, 1.05)
        _over_steps(ax, title, ylabel)
        ax.legend(fontsize=8)
    fig.suptitle("DPO: implicit rewards")
    return fig


def grpo_figure(series: dict):
    rewards = {k: v for k, v in series.items() if k.startswith("rewards/") and k.endswith("/mean")}
    if "reward" not in series and not rewards:
        return None
    fig, (ax,) = _grid(1, width=7)
    if "reward" in series:
        steps, mean = series["reward"]
        ax.plot(steps, mean, marker="o", ms=3, color="black", label="total reward (weighted)")
        if "reward_std" in series and len(series["reward_std"][1]) == len(mean):
            std = series["reward_std"][1]
            ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], color="grey", alpha=0.2,
                            label="± std within groups")
    for key, (steps, values) in sorted(rewards.items()):
        ax.plot(steps, values, lw=1.2, ls="--", label=key.split("/")[1])
    _over_steps(ax, "GRPO: mean reward of the sampled completions", "reward")
    ax.legend(fontsize=8)
    return fig


def accuracy_figure(tables: dict):
    if not tables:
        return None
    fig, axes = _grid(len(tables), width=6.5, height=4)
    for ax, (task, table) in zip(axes, tables.items(), strict=True):
        qtypes = sorted({q for scores in table.values() for q in scores if q != "all"}) + ["all"]
        width = 0.8 / len(table)
        colors = {"question-only prior": "lightgrey"}
        for i, (label, scores) in enumerate(table.items()):
            xs = [x + (i - (len(table) - 1) / 2) * width for x, q in enumerate(qtypes) if q in scores]
            ax.bar(xs, [scores[q] for q in qtypes if q in scores], width, label=label, color=colors.get(label),
                   edgecolor="black" if label in colors else None, lw=0.5)
        ax.set_xticks(range(len(qtypes)), [q if q != "all" else "all types" for q in qtypes], rotation=20)
        ax.set(title=METRIC_TITLES[task], xlabel="question type", ylabel="accuracy", ylim=(0, 1.05))
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Accuracy per question type: base vs question-only prior vs each checkpoint")
    return fig


def checkpoints_figure(rows: list[dict], metrics: dict[str, float], final: str | None):
    """eval.checkpoints=all: each training stage's scores at the checkpoints it saved (95 % band), ending at its final
    model's score (``final``: the stage whose model is the pipeline's, scored as ``eval/<metric>``)."""
    if not rows:
        return None
    keys = ["mean_accuracy"] + [m for m in METRIC_TITLES if any(m in r["metrics"] for r in rows)]
    fig, axes = _grid(len(keys))
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    for ax, key in zip(axes, keys, strict=True):
        for stage in stages:
            mine = sorted((r for r in rows if r["stage"] == stage and key in r["metrics"]), key=lambda r: r["step"])
            steps, values = [r["step"] for r in mine], [r["metrics"][key] for r in mine]
            low = [r["metrics"].get(f"{key}_ci_low", v) for r, v in zip(mine, values, strict=True)]
            high = [r["metrics"].get(f"{key}_ci_high", v) for r, v in zip(mine, values, strict=True)]
            score = metrics.get(f"eval/{stage}_{key}", metrics.get(f"eval/{key}") if stage == final else None)
            if score is not None and f"{stage}/steps" in metrics:  # the stage's model, where its curve ends
                steps, values = steps + [metrics[f"{stage}/steps"]], values + [score]
            (line,) = ax.plot(steps, values, marker="o", ms=3, label=stage)
            ax.fill_between(steps[:len(low)], low, high, color=line.get_color(), alpha=0.15)
        _over_steps(ax, METRIC_TITLES.get(key, "mean accuracy over tasks"), "score")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    fig.suptitle("Scores of the checkpoints each stage saved, while it trained (last point: its final model)")
    return fig


def cost_figure(stages: list[dict]):
    fig, (ax,) = _grid(1, width=7, height=0.5 * len(stages) + 1.6)
    names = [s["name"] for s in stages][::-1]
    usd = [s["cost_usd"] for s in stages][::-1]
    cached = [bool(s.get("reused_from")) for s in stages][::-1]
    bars = ax.barh(names, usd, color=["lightsteelblue" if c else "tab:blue" for c in cached], edgecolor="black",
                   lw=0.5)
    for bar, s, c in zip(bars, stages[::-1], cached, strict=True):
        ax.annotate(f" ${s['cost_usd']:.3g} · {s['wall_seconds']:.0f} s{' (cached)' if c else ''}",
                    (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=8)
    ax.set_xlim(0, max(usd + [1e-9]) * 1.45)
    ax.set(title=f"Cost per stage: ${sum(usd):.3g} in all (pale: reused from the cache)", xlabel="USD")
    ax.grid(axis="x", alpha=0.3)
    return fig


PHASE_COLORS = {"start": "tab:gray", "steps": "tab:blue", "generation": "tab:green", "scoring": "tab:olive",
                "saving": "tab:orange", "idle": "lightgray"}


def held_figure(stages: list[dict]):
    """One bar per stage that held devices: the share of its held device-seconds per phase (runtime.cost.PHASES),
    the busy ones blue-green, utilization at the right."""
    held = [s for s in stages if s.get("held") and sum(s["held"].values()) > 0][::-1]
    if not held:
        return None
    fig, (ax,) = _grid(1, width=7, height=0.45 * len(held) + 1.9)
    left = [0.0] * len(held)
    for phase in PHASES:
        share = [s["held"].get(phase, 0.0) / sum(s["held"].values()) for s in held]
        ax.barh([s["name"] for s in held], share, left=left, color=PHASE_COLORS[phase], edgecolor="black", lw=0.4,
                label=phase)
        left = [a + b for a, b in zip(left, share, strict=True)]
    for i, s in enumerate(held):
        busy = sum(s["held"].get(p, 0.0) for p in BUSY_PHASES) / sum(s["held"].values())
        ax.annotate(f" busy {busy:.2f} of {sum(s['held'].values()):.0f} device-s", (1.0, i), va="center", fontsize=8)
    ax.set_xlim(0, 1.4)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set(title="Where each stage's held device time went (busy: steps, generation, scoring)",
           xlabel="share of held device-seconds")
    ax.legend(fontsize=7, ncol=len(PHASES), loc="upper center", bbox_to_anchor=(0.5, -0.25), frameon=False)
    return fig


def grades_figure(frozen: dict):
    if not frozen:
        return None
    fig, axes = _grid(len(frozen))
    for ax, (stage, groups) in zip(axes, frozen.items(), strict=True):
        for group, (steps, values) in groups.items():
            ax.step(steps, values, where="post", lw=2 if group == "all" else 1.2, label=group)
        _over_steps(ax, f"{stage}: GradES frozen fraction", "fraction of weight matrices frozen")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=8)
    return fig


def figures(run: Run) -> dict[str, tuple[str, object]]:
    """file stem -> (section title, matplotlib figure), in report order; figures without data are left out."""
    stage_curves = curves(run)
    outputs = next((s["outputs"] for s in run.result["stages"] if s["name"] == "eval"), {})
    scored = outputs.get("scored")  # the checkpoints the eval scored, the pipeline's final model last
    made = {
        "loss": ("Training loss", loss_figure(stage_curves)),
        "dpo_rewards": ("DPO reward margin and accuracy", dpo_figure(stage_curves.get("dpo", {}))),
        "grpo_rewards": ("GRPO rewards", grpo_figure(stage_curves.get("grpo", {}))),
        "accuracy": ("Accuracy per question type", accuracy_figure(accuracy_table(run.result))),
        "checkpoints": ("Scores while training (eval.checkpoints=all)", checkpoints_figure(
            checkpoint_rows(outputs.get("checkpoints", []), run.run_dir / "result.json"), run.result["metrics"],
            scored[-1] if isinstance(scored, list) and scored and isinstance(scored[-1], str) else None)),
        "cost": ("Cost per stage", cost_figure(run.result["stages"])),
        "held": ("Held device time per stage", held_figure(run.result["stages"])),
        "grades": ("GradES: frozen weight matrices", grades_figure(grades_curves(run, stage_curves))),
    }
    return {stem: (title, fig) for stem, (title, fig) in made.items() if fig is not None}


def against_base(run: Run) -> str | None:
    """An HTML table of the final model against the base model on the items both scored (harness compare's paired
    statistics), or None where the eval stage did not score the base model."""
    from harness import compare  # scipy (~1 s): only for a run whose eval scored the base model too

    try:
        scored, where = compare.scored_checkpoints(run.result, run.run_dir)
    except UserError:  # no eval stage, or none recorded: nothing to compare
        return None
    if "base" not in scored or scored[-1] == "base":
        return None
    try:
        result = compare.compare(compare.Side("base", run, "base", where),
                                 compare.Side(scored[-1], run, scored[-1], where))
    except UserError as exc:
        run.notes.append(f"the paired comparison with the base model is left out: {exc}")
        return None
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(task)}</td><td>{r['items']}</td><td>{r['a']:.3f}</td><td>{r['b']:.3f}</td>"
        f"<td>{r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]</td><td>{r['p_value']:.3g}</td>"
        f"<td>{esc(r['test'])}</td><td>{'-' if r['detectable'] is None else format(r['detectable'], '.3f')}</td>"
        f"<td>{esc(compare.verdict(r))}</td></tr>" for task, r in result["tasks"].items())
    return (f"<h2>{esc(scored[-1])} against the base model, item by item</h2>\n<table><tr><th>task</th><th>items</th>"
            f"<th>base</th><th>{esc(scored[-1])}</th><th>difference [95% CI]</th><th>p</th><th>test</th>"
            f"<th>detects (80% power)</th><th>verdict</th></tr>{rows}</table>\n<p><small>{esc(compare.LEGEND)} "
            f"{esc(compare.cost_line(result))}</small></p>")


# -- the report ------------------------------------------------------------------------------------------------

def write_report(run: Run) -> Path:
    """Write ``<run dir>/report/`` (report.html and one PNG per figure); log it to the parent MLflow run."""
    plt = _plt()
    paired = against_base(run)
    sections = [paired] if paired else []
    pngs = {}  # drawn before report/ exists: a file the figures read that is bad stops the command with nothing made
    for stem, (title, fig) in figures(run).items():
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        pngs[f"{stem}.png"] = buf.getvalue()
        data = base64.b64encode(buf.getvalue()).decode()
        sections.append(f'<h2>{html.escape(title)}</h2>\n<img alt="{html.escape(title)}" '
                        f'src="data:image/png;base64,{data}">')
    out = run.run_dir / "report"
    out.mkdir(exist_ok=True)
    for name, png in pngs.items():
        (out / name).write_bytes(png)
    path = out / "report.html"
    path.write_text(_page(run, sections))
    if run.client is not None and run.mlflow_run_id:
        run.client.log_artifacts(run.mlflow_run_id, str(out), "report")
    return path


def _page(run: Run, sections: list[str]) -> str:
    r, esc = run.result, html.escape
    m = r["metrics"]
    head = [("run", r["run_id"]), ("pipeline", r["pipeline"]), ("cost", f"${r['cost_usd']:.4g}"),
            ("accelerator-hours", f"{r['accelerator_hours']:.4g}"), ("wall time", f"{r['wall_seconds']:.0f} s")]
    head += [(METRIC_TITLES[t], f"{m[f'eval/{t}']:.3f}") for t in METRIC_TITLES if f"eval/{t}" in m]
    if "eval/mean_accuracy" in m:
        head.append(("mean accuracy", f"{m['eval/mean_accuracy']:.3f}"))
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in head)
    stages = "".join(
        f"<tr><td>{esc(s['name'])}{' (cached)' if s.get('reused_from') else ''}</td><td>{s['wall_seconds']:.1f}</td>"
        f"<td>{s['accelerator_hours']:.5f}</td><td>{s['cost_usd']:.5f}</td><td>{esc(s.get('device', ''))}</td></tr>"
        for s in r["stages"])
    notes = "".join(f"<p class=note>{esc(n)}</p>" for n in run.notes)
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>vlmlab report · {esc(r['run_id'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ padding: 3px 10px; border-bottom: 1px solid #ddd; }}
th {{ text-align: left; }} td {{ text-align: right; }} td:first-child {{ text-align: left; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0 2em; }} .note {{ color: #a60; }}
</style></head><body>
<h1>vlmlab run report</h1>
<table>{rows}</table>
<table><tr><th>stage</th><th>wall s</th><th>accel-h</th><th>USD</th><th>device</th></tr>{stages}</table>
{notes}
{chr(10).join(sections)}
<p><small>made {made} by <code>harness report</code> from result.json and the MLflow store</small></p>
</body></html>
"""


# -- harness ui ------------------------------------------------------------------------------------------------

def serve_ui(uri: str, host: str, port: int, experiment: str, say=print) -> None:
    """Run `mlflow ui` on ``uri`` in the foreground; once it answers /health, ``say`` the cost view's address.
    Returns when the server exits; on Ctrl-C/SIGTERM (KeyboardInterrupt) it stops the server first."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request


    if uri.startswith(("http://", "https://")):
        exp = _client(uri).get_experiment_by_name(experiment)
        view = cost_view_url(exp.experiment_id) if exp else ""
        say(f"{redact_text(uri)} is already an MLflow server: open {redact_text(uri.rstrip('/'))}/{view}")
        return
    if not store_exists(uri):
        raise UserError(f"no MLflow store at {uri}: run a pipeline first (`harness run sft`), or pass --tracking-uri")
    exp = _client(uri).get_experiment_by_name(experiment)
    if exp is not None:
        publish_cost_view(_client(uri), exp.experiment_id)  # runs logged before the view existed get it too
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{local}:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
                               "--port", str(port), "--workers", "1"], start_new_session=True)
    try:
        while True:
            if server.poll() is not None:
                raise UserError(f"mlflow ui exited with code {server.returncode} (port {port} in use? try --port)")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        view = f"{base}/{cost_view_url(exp.experiment_id)}" if exp else f"{base} (no experiment '{experiment}' yet)"
        say(f"MLflow UI on {redact_text(uri)}\nruns with their cost: {view}\nCtrl-C stops it")
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:  # the server and its workers: the process group it leads
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
