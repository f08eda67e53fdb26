"""`harness reproduce RUN`: rerun a recorded run's config from scratch and compare it metric by metric."""
from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from harness.commands.common import console, err, styled, warn


def reproduce(
    target: str = typer.Argument(..., help="A run directory or its result.json."),
    tolerance: float | None = typer.Option(None, "--tolerance", min=0, help="Largest allowed |now - recorded| on a "
                                           "0-1 metric (relative on others). Default: exact on the same CPU model and "
                                           "thread count, 0.02 on another CPU, 0.005 on a GPU (said with the table)."),
    trust: bool = typer.Option(False, "--trust", help="Allow what the recorded config would run or change: custom "
                               "GRPO rewards (imported), model.trust_remote_code, a stage's runtime_env."),
    output_dir: str | None = typer.Option(None, "--output-dir", "-o", help="Where the rerun goes "
                                             "(default: beside the recorded run)."),
):
    """Rerun a recorded run's config from scratch and compare its metrics; exit 1 if any differs."""
    # the pipeline (MLflow, Ray, the stages) and the code fingerprints: only when a run is reproduced
    from harness.console import Display
    from harness.pipeline import run_pipeline
    from harness.reproduce import (
        code_differences,
        compare_metrics,
        load_result,
        manifest_differences,
        recorded_config,
        tolerance_for,
    )

    recorded, path = load_result(target)
    cfg = recorded_config(recorded, path, trust)
    for difference in code_differences(recorded):  # said before the rerun, so a mismatch is read in context
        warn(difference)
    with Display(console, capture=True) as display:  # library output to the rerun's logs
        now = run_pipeline(cfg, recorded["pipeline"], output_dir or str(path.parent.parent), console=console,
                           force=True, display=display)
    for warning in manifest_differences(recorded["manifest"], now["manifest"]):
        warn(f"manifest differs: {warning}")
    tolerance, why = tolerance_for(recorded["manifest"], now["manifest"], tolerance)
    console.print(f"tolerance {tolerance:g}: {why}", highlight=False)
    rows = compare_metrics(recorded["metrics"], now["metrics"], tolerance)
    console.print(comparison_table(rows, f"reproduce {recorded['run_id']} (tolerance {tolerance:g})"))
    bad = [r["metric"] for r in rows if not r["ok"]]
    if bad:
        err.print(styled(("not reproduced", "bold red"), f": {', '.join(bad)}"), highlight=False)
        raise typer.Exit(code=1)
    console.print(styled(("reproduced", "green"), f": {len(rows)} metrics within {tolerance:g} (rerun: "
                                                  f"{now['run_dir']})"), highlight=False)


def _num(value) -> str:
    return "missing" if value is None else f"{value:.6g}"


def comparison_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("metric", "recorded", "now", "delta", ""):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for r in rows:
        table.add_row(r["metric"], _num(r["recorded"]), _num(r["now"]), _num(r["delta"]),
                      Text("ok", style="green") if r["ok"] else Text("DIFFERS", style="red"))
    return table
