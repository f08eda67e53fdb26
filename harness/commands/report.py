"""`harness report RUN`: one run's figures in a self-contained HTML file, also logged to its MLflow run."""
from __future__ import annotations

import typer

from harness.commands.common import console, styled, warn


def report(
    target: str = typer.Argument(..., help="A run directory, or a run id (under --output-dir or in MLflow)."),
    experiment: str | None = typer.Option(None, "--experiment", "-e", help="Default: the run's tracking.experiment."),
    output_dir: str = typer.Option("runs", "--output-dir", "-o", help="Where run directories are."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="Default: the run's tracking.uri, "
                                            "$MLFLOW_TRACKING_URI or sqlite:///mlflow.db"),
):
    """One run's figures in a self-contained HTML file, also logged to its MLflow run.

    Writes <run dir>/report/report.html (figures embedded) and the same figures as PNG files beside it: loss per
    training stage, DPO reward margin and accuracy, GRPO rewards, accuracy per question type (base, question-only
    prior, each checkpoint), cost per stage, GradES frozen fraction."""
    from harness import report as rep  # MLflow's client and matplotlib (~2 s): only when a report is drawn

    run = rep.resolve(target, tracking_uri, experiment, output_dir)
    path = rep.write_report(run)
    for note in run.notes:
        warn(note)
    logged = " and logged to its MLflow run (artifacts: report/)" if run.mlflow_run_id else ""
    console.print(styled("report written to ", (str(path), "bold"), logged), soft_wrap=True, highlight=False)
