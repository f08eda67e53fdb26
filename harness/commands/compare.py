"""`harness compare A B`: the paired difference per task on the items both runs scored, with its interval, p-value,
detectable difference and the cost difference (harness/compare.py)."""
from __future__ import annotations

import json

import typer

from harness.commands.common import console


def compare(
    a: str = typer.Argument(..., help="Run A: a run directory or run id; RUN@CHECKPOINT picks a scored checkpoint "
                            "other than the final one (e.g. runs/X@sft in a dpo run)."),
    b: str = typer.Argument(..., help="Run B, as A."),
    tasks: list[str] | None = typer.Option(None, "--tasks", "-t", help="Only these tasks (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and permutation resamples."),
    experiment: str | None = typer.Option(None, "--experiment", "-e", help="Default: each run's tracking.experiment."),
    output_dir: str = typer.Option("runs", "--output-dir", "-o", help="Where run directories are."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="Default: each run's tracking.uri, "
                                            "$MLFLOW_TRACKING_URI or sqlite:///mlflow.db"),
):
    """Is B better than A? Per task, on the items both scored: B - A with a paired bootstrap 95 % interval, a p-value
    (exact McNemar for 0/1 scores, a paired permutation test otherwise), the smallest difference that many items
    detect at 80 % power, and what each model cost to make."""
    # scipy (~1 s of imports) and MLflow's client: only when runs are compared
    from harness import compare as cmp

    first = cmp.side(a, tracking_uri, experiment, output_dir)
    second = cmp.side(b, tracking_uri, experiment, output_dir)
    result = cmp.compare(first, second, tasks, seed)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(cmp.table(result))
    console.print(cmp.cost_line(result), soft_wrap=True, highlight=False)
    console.print(cmp.LEGEND, highlight=False)
