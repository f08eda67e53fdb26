"""`harness run PIPELINE [key=value ...]`: run a pipeline end to end; also the driver of `harness eval`."""
from __future__ import annotations

import os
from collections.abc import Callable

import typer
from rich.table import Table
from rich.text import Text

from evals.registry import TASKS
from harness.commands.common import CONFIG_HELP, VERBOSE_HELP, console, disk_full, err, interruptible, load, styled


def run(
    pipeline: str = typer.Argument("sft", help="Pipeline name from the config's `pipelines` (sft, dpo, grpo...)."),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides, e.g. sft.max_steps=50"),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    output_dir: str | None = typer.Option(None, "--output-dir", "-o", help="Where run directories go."),
    force: bool = typer.Option(False, "--force", help="Recompute every stage (ignore the stage cache)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Run a pipeline end to end (default: `sft` on the embedded tiny preset).

    The console shows one live line per stage (step/total, loss or reward, samples/s, ETA, dollars so far), one
    line per finished stage and the summary; Ray's, the libraries' and the workers' output goes to
    <run dir>/logs/ (-v: here as well)."""
    run_and_summarize(lambda: load(config, overrides), pipeline, output_dir, force, verbose)


def run_and_summarize(load_config: Callable, pipeline: str, output_dir: str | None, force: bool,
                      verbose: bool = False) -> None:
    """Load the config (``load_config()``), run ``pipeline`` and print its summary."""
    # the pipeline imports MLflow, Ray and the stages' registries (~3 s): only a command that runs one pays that
    from harness.console import Display
    from harness.pipeline import run_pipeline
    from runtime.output import VERBOSE_ENV

    interruptible()
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # inherited by Ray's workers: their output is printed here too
    try:
        cfg = load_config()
        cfg.stages_of(pipeline)
        with Display(console, capture=True) as display:  # library output to the run's logs until it closes
            result = run_pipeline(cfg, pipeline, output_dir, console=console, force=force, display=display)
    except KeyboardInterrupt:
        err.print(styled(("interrupted", "bold red"), ": MLflow runs marked KILLED; finished stages are cached and "
                         "training resumes from its last checkpoint: rerun the same command to resume."))
        raise typer.Exit(code=130) from None
    except Exception as exc:
        where = disk_full(exc)
        if not where:
            raise
        err.print(styled(("error:", "bold red"), f" disk full ({where}). Earlier results and cached stages are intact "
                         "(every write is atomic); free some space and rerun the same command to resume."),
                  highlight=False)
        raise typer.Exit(code=1) from None
    console.print(summary_table(result))
    for line in metric_lines(result["metrics"]):
        console.print(line)
    console.print(styled("run directory: ", (str(result["run_dir"]), "bold")), highlight=False)


def with_interval(metrics: dict, key: str) -> str:
    """``0.473 ± 0.031`` (half the 95 % interval) where the interval was recorded."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return f"{metrics[key]:.3f}" + (f" ± {(high - low) / 2:.3f}" if low is not None and high is not None else "")


def key_metrics(stage: dict) -> dict[str, float]:
    """A few numbers per stage for the summary table: the data stage's sizes summed over its tasks, eval's mean
    accuracy (each task's score follows the table), the first three of any other stage."""
    metrics = {k.split("/", 1)[1]: v for k, v in stage["metrics"].items()
               if k.count("/") == 1 and "prior" not in k and not k.endswith(("_ci_low", "_ci_high"))}
    if stage["name"] == "data":
        totals: dict[str, float] = {}
        for key, value in metrics.items():
            task, _, field = key.partition("_")
            if task in TASKS:
                totals[field] = totals.get(field, 0) + value
        return {"tasks": len({k.partition("_")[0] for k in metrics} & set(TASKS))} | totals
    if "mean_accuracy" in metrics:
        return {"mean_accuracy": metrics["mean_accuracy"]}
    return dict(list(metrics.items())[:3])


def summary_table(result: dict) -> Table:
    """One row per stage (wall, accelerator-hours, USD, key metrics) and the total."""
    table = Table(title=f"{result['pipeline']} · {result['run_id']}")
    for col in ("stage", "wall s", "accel-h", "cost USD", "key metrics"):
        table.add_column(col, justify="right" if col != "key metrics" else "left")
    for s in result["stages"]:
        shown = ", ".join(f"{k}={int(v):,}" if float(v).is_integer() else f"{k}={v:.3g}"
                          for k, v in key_metrics(s).items())
        name = f"{s['name']} (cached)" if "reused_from" in s else s["name"]
        table.add_row(name, f"{s['wall_seconds']:.1f}", f"{s['accelerator_hours']:.5f}",
                      f"{s['cost_usd']:.5f}", shown)
    table.add_row("total", f"{result['wall_seconds']:.1f}", f"{result['accelerator_hours']:.5f}",
                  f"{result['cost_usd']:.5f}", "", style="bold")
    return table


def metric_lines(m: dict) -> list[Text]:
    """Each task's score with its interval, beside the base model's and the question-only prior's."""
    lines = []
    for task in TASKS.values():
        if f"eval/{task.metric}" in m:
            others = [f"{label} {m[f'eval/{key}_{task.metric}']:.3f}" for label, key in
                      (("base", "base"), ("question-only prior", "prior")) if f"eval/{key}_{task.metric}" in m]
            lines.append(styled(f"{task.metric}: ", (with_interval(m, f"eval/{task.metric}"), "bold"),
                                f" ({', '.join(others)})" if others else ""))
    return lines
