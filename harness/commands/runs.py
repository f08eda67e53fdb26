"""`harness runs`: recent runs, newest first."""
from __future__ import annotations

import typer

from harness.commands.common import TRACKING_HELP, console, reading_store


def runs(
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="How many runs, newest first."),
    experiment: str = typer.Option("vlmlab", "--experiment", "-e", help="MLflow experiment to read."),
    output_dir: str = typer.Option("runs", "--output-dir", "-o", help="Run directories to list too (those MLflow "
                                   "does not know)."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
):
    """Recent runs, newest first: id, pipeline, status, accuracies and cost."""
    # MLflow's client (~1.5 s of imports): only when runs are listed
    from harness import report
    from runtime.config import TrackingConfig

    uri = TrackingConfig(uri=tracking_uri).resolved_uri()
    with reading_store(uri):
        rows = report.recent_runs(uri if report.store_exists(uri) else None, experiment, output_dir, limit)
    if not rows:
        console.print(f"No runs in MLflow experiment '{experiment}' at {uri} nor under {output_dir}/. "
                      "Run `harness run sft` first.", highlight=False)
        return
    console.print(report.runs_table(rows))
    console.print(report.RUNS_FOOTER, highlight=False)
