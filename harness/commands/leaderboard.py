"""`harness leaderboard`: runs ranked by accuracy with their cost, the Pareto front marked."""
from __future__ import annotations

import re

import typer

from harness.commands.common import TRACKING_HELP, console, err, reading_store
from runtime.errors import UserError


def leaderboard(
    experiment: str = typer.Option("vlmlab", "--experiment", "-e", help="MLflow experiment to read."),
    pipeline: str | None = typer.Option(None, "--pipeline", "-p", help="Only runs of this pipeline."),
    metric: str = typer.Option("eval/mean_accuracy", "--metric", "-m", help="Accuracy metric to rank by."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | markdown | csv | json"),
    plot_path: str | None = typer.Option(None, "--plot", help="Write a cost-vs-accuracy PNG here."),
    sort: str = typer.Option("acc", "--sort", "-s", help="Column to order by: acc, vqa, chart, usd, $/pt, acc-h, "
                             "util, run, pipe, model (accuracies and util best first, costs cheapest first)."),
    filters: list[str] | None = typer.Option(None, "--filter", help="KEY=VALUE with KEY pipeline, model or run; "
                                             "VALUE may use * and ? (e.g. model='*SmolVLM*'). Repeatable."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
):
    """Runs ranked by accuracy with their cost; marks the Pareto front (no run both cheaper and better)."""
    # MLflow's client (~1.5 s of imports) and matplotlib: only when a leaderboard is read
    from harness import leaderboard as lb
    from runtime.config import TrackingConfig
    from runtime.tracking import Tracker

    if fmt not in ("table", "markdown", "csv", "json"):
        raise UserError(f"--format must be table, markdown, csv or json (got {fmt!r})")
    if pipeline is not None and not re.fullmatch(r"[\w.-]+", pipeline):
        raise UserError(f"--pipeline {pipeline!r}: not a pipeline name (letters, digits, _ . -); "
                        "`harness runs` lists the pipelines run")
    uri = TrackingConfig(uri=tracking_uri).resolved_uri()
    with reading_store(uri):
        rows = lb.collect(uri, experiment, pipeline, metric, filters, sort)
    if not rows:
        console.print(f"No finished vlmlab runs with '{metric}' in experiment '{experiment}' at {uri}. "
                      "Run `harness run sft` first.", highlight=False)
        return
    if fmt != "table":
        print(lb.render(rows, fmt))
    else:
        console.print(lb.table(rows, f"leaderboard · {experiment} · {metric}"))
        console.print("★ Pareto front: no other run shown is both cheaper and more accurate.\n"
                      "acc-h: accelerator-hours · $/pt: USD per accuracy point · util: busy/held time")
        console.print(lb.ui_hint(uri, rows[0]["experiment_id"]), soft_wrap=True, highlight=False)
    if plot_path:
        fig = lb.plot(rows, plot_path, metric)
        tracker = Tracker(uri, experiment)
        run_id = tracker.start("leaderboard", tags={"vlmlab.kind": "leaderboard"})
        tracker.log_figure(run_id, fig, "leaderboard.png")
        tracker.end(run_id)
        err.print(f"plot written to {plot_path} (and logged to MLflow run 'leaderboard')", highlight=False)
