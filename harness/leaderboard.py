"""Leaderboards of cost vs accuracy, read from MLflow: one row per finished pipeline run."""
from __future__ import annotations

import csv
import io
import json
import math
from fnmatch import fnmatchcase
from pathlib import Path

from evals.registry import TASKS
from runtime.errors import UserError
from runtime.secrets import redact_text
from runtime.tracking import cost_view_url, store_exists

DEFAULT_METRIC = "eval/mean_accuracy"
# `--sort` names (the table's short headers, task names, or the row keys of --format json): row key, best first
SORTS = {"acc": ("accuracy", True), "usd": ("usd", False), "$/pt": ("usd_per_point", False),
         "acc-h": ("accelerator_hours", False), "util": ("utilization", True), "run": ("run", False),
         "pipe": ("pipeline", False), "model": ("model", False)} | {t.name: (t.metric, True) for t in TASKS.values()}
SORTS |= {key: (key, desc) for key, desc in SORTS.values()}
FILTERS = ("pipeline", "model", "run")


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For points (x, y), both the higher the better: True where no other point is at least as good on both and
    strictly better on one (identical points keep each other on the front). Costs go in negated."""
    return [not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points) for x, y in points]


def collect(uri: str, experiment: str, pipeline: str | None, metric: str, filters: list[str] | None = None,
            sort: str = "acc") -> list[dict]:
    """Finished parent runs of ``experiment`` as leaderboard rows, narrowed by ``filters`` (``key=glob``, keys in
    FILTERS), ordered by ``sort`` (a key of SORTS; default: the metric, best first); Pareto front among them."""
    if sort not in SORTS:
        raise UserError(f"--sort: unknown column '{sort}' (one of acc, usd, $/pt, acc-h, util, run, pipe, model, "
                        f"a task ({', '.join(TASKS)}), or a key of --format json)")
    wanted = [_filter(f) for f in filters or []]
    if not store_exists(uri):  # no store, no runs (reading a missing SQLite file would create an empty one)
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = "attributes.status = 'FINISHED' and tags.`vlmlab.pipeline` != ''"
    if pipeline:
        query += f" and tags.`vlmlab.pipeline` = '{pipeline}'"
    rows = []
    for run in client.search_runs([exp.experiment_id], filter_string=query, max_results=10000):
        m, p = run.data.metrics, run.data.params
        if metric not in m or "cost/usd" not in m:
            continue
        usd, acc = m["cost/usd"], m[metric]
        rows.append({
            "run": run.info.run_name, "run_id": run.info.run_id, "experiment_id": exp.experiment_id,
            "pipeline": run.data.tags["vlmlab.pipeline"],
            "model": p.get("model.source", "?"), "metric": metric, "accuracy": acc,
            "ci_low": m.get(f"{metric}_ci_low"), "ci_high": m.get(f"{metric}_ci_high"),
            **{t.metric: m.get(f"eval/{t.metric}") for t in TASKS.values()},
            "accelerator_hours": m.get("cost/accelerator_hours", 0.0), "usd": usd,
            "usd_per_point": usd / (100 * acc) if acc > 0 else math.inf,
            "utilization": m.get("cost/utilization"),
            "run_dir": run.data.tags.get("vlmlab.run_dir"),
        })
    rows = [r for r in rows if all(fnmatchcase(str(r[key]).lower(), glob.lower()) for key, glob in wanted)]
    for row, front in zip(rows, pareto_front([(-r["usd"], r["accuracy"]) for r in rows]), strict=False):
        row["pareto"] = front
    rows.sort(key=lambda r: (-r["accuracy"], r["usd"]))
    mark_ties(rows, metric)
    key, descending = SORTS[sort]
    present = [r for r in rows if r[key] is not None]  # runs without the value go last
    present.sort(key=lambda r: r[key], reverse=descending)  # stable: ties keep the accuracy order
    return present + [r for r in rows if r[key] is None]


def metric_tasks(metric: str) -> list[str] | None:
    """The tasks a leaderboard metric averages: every task for the mean accuracy, one for a task's metric."""
    if metric == DEFAULT_METRIC:
        return list(TASKS)
    return next(([t.name] for t in TASKS.values() if metric == f"eval/{t.metric}"), None)


def mark_ties(rows: list[dict], metric: str = DEFAULT_METRIC) -> None:
    """``tie``: the data cannot tell the run from the leader (the most accurate run). Where both runs' predictions
    are at hand and they answered the same items, a paired test decides (harness compare's; ``tie_p``: its p-value,
    tie where p >= 0.05); otherwise, whether the two 95 % intervals overlap (conservative: it ignores that the runs
    answered the same items). None where neither can be told (runs scored before intervals existed)."""
    leader = rows[0] if rows else None
    tasks = metric_tasks(metric)
    scores: dict[str, dict | None] = {}

    def item_scores(row: dict) -> dict | None:
        if not tasks or not row.get("run_dir"):
            return None
        if row["run_dir"] not in scores:
            from harness import compare  # scipy (~1 s): only where runs have predictions to pair

            try:
                scores[row["run_dir"]] = compare.final_scores(Path(row["run_dir"]))
            except UserError:  # moved, deleted, or from another machine: the intervals decide
                scores[row["run_dir"]] = None
        return scores[row["run_dir"]]

    for row in rows:
        row["tie_p"] = None
        if row is leader:
            row["tie"] = False if None not in (row["ci_low"], row["ci_high"]) else None
            continue
        mine, theirs = item_scores(row), item_scores(leader)
        if mine is not None and theirs is not None:
            from harness import compare

            scored = [t for t in tasks if t in theirs]  # the leader's tasks: the row must have scored each
            p = compare.paired_p(theirs, mine, scored) if scored else None
            if p is not None:
                row["tie"], row["tie_p"] = p >= 0.05, p
                continue
        known = None not in (row["ci_low"], row["ci_high"], leader["ci_low"], leader["ci_high"])
        row["tie"] = (row["ci_high"] >= leader["ci_low"] and row["ci_low"] <= leader["ci_high"]) if known else None


def accuracy_cell(row: dict) -> str:
    """``0.422±.031``: the metric and its 95 % interval's half-width; ``=`` in front when tied with the leader."""
    text = f"{row['accuracy']:.3f}"
    if row["ci_low"] is not None and row["ci_high"] is not None:
        text += f"±{(row['ci_high'] - row['ci_low']) / 2:.3f}".replace("0.", ".", 1)
    return ("=" if row.get("tie") else "") + text


def _filter(text: str) -> tuple[str, str]:
    key, sep, glob = text.partition("=")
    if not sep or key not in FILTERS or not glob:
        raise UserError(f"--filter '{text}': give KEY=VALUE with KEY one of {', '.join(FILTERS)} (VALUE may use * "
                        "and ?, e.g. model='*SmolVLM*')")
    return key, glob


def render(rows: list[dict], fmt: str) -> str:
    """markdown, csv or json text (the rich table is drawn by the CLI)."""
    if fmt == "json":
        return json.dumps(rows, indent=2, default=lambda v: None)
    cols = ["run", "pipeline", "model", "accuracy", "ci_low", "ci_high", "tie", "tie_p",
            *(t.metric for t in TASKS.values()), "accelerator_hours", "usd", "usd_per_point", "utilization", "pareto"]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c), c) for c in cols) + " |")
    return "\n".join(lines)


def table(rows: list[dict], title: str):
    """The rich table `harness leaderboard` prints: short headers, fits 80 columns (long model names are cut)."""
    from rich import box
    from rich.table import Table

    out = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False,  # one space between columns
                caption="★ cost-accuracy Pareto front · acc ± half its 95% interval · = tied with the leader "
                "(a paired test where both runs' predictions are at hand, else overlapping intervals)")
    for col in ("", "run", "pipe", "model", "acc", "acc-h", "USD", "$/pt", "util"):
        left = col in ("run", "pipe", "model")
        # a long run name folds onto a second line (it is an id to copy); a long model name is cut
        out.add_column(col, justify="left" if left else "right", no_wrap=col != "run",
                       overflow="ellipsis" if col == "model" else "fold", max_width=10 if col == "model" else None)
    for r in rows:
        model = r["model"].rstrip("/").rsplit("/", 1)[-1]  # a hub id's or directory's last part
        out.add_row("★" if r["pareto"] else "", r["run"], r["pipeline"], model, accuracy_cell(r),
                    f"{r['accelerator_hours']:.4f}", f"{r['usd']:.3g}", f"{r['usd_per_point']:.1e}",
                    "" if r["utilization"] is None else f"{r['utilization']:.2f}")
    return out


def _cell(v, col: str = "") -> str:
    if isinstance(v, bool):
        return ("=" if col == "tie" else "★") if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def plot(rows: list[dict], path: str, metric: str):
    """Cost vs accuracy scatter with the Pareto front drawn; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["usd"], r["accuracy"], s=60 if r["pareto"] else 30,
                   color="tab:red" if r["pareto"] else "tab:blue", zorder=3)
        ax.annotate(f"{r['pipeline']}:{r['run'][-6:]}", (r["usd"], r["accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    front = sorted((r["usd"], r["accuracy"]) for r in rows if r["pareto"])
    if front:
        ax.step([c for c, _ in front], [a for _, a in front], where="post", color="tab:red", lw=1.2,
                label="Pareto front")
        ax.legend(loc="lower right")
    ax.set_xlabel("cost (USD)")
    ax.set_ylabel(metric)
    ax.set_title("vlmlab: cost vs accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def ui_hint(uri: str, experiment_id: str) -> str:
    """Where to see these runs with their cost columns in MLflow's own UI."""

    view = cost_view_url(experiment_id)
    if uri.startswith(("http://", "https://")):
        return f"MLflow UI with these columns: {redact_text(uri.rstrip('/'))}/{view}"
    return f"MLflow UI with these columns: run `harness ui`, then open http://127.0.0.1:5000/{view}"
