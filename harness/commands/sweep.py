"""`harness sweep [PRESET] [key=value ...] [--space ...]`: Ray Tune over a pipeline, every trial scored by eval."""
from __future__ import annotations

import os

import typer
from rich.table import Table

from harness.commands.common import CONFIG_HELP, console, load, styled


def sweep(
    preset: str | None = typer.Argument(None, help="dpo-beta | grades | grades-dpo (or leave out and give "
                                        "--space)."),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides for every trial"),
    space: list[str] | None = typer.Option(None, "--space", "-s", help="key=sampler(args): loguniform, "
                                              "uniform, randint, choice, grid. Repeatable."),
    pipeline: str = typer.Option(None, "--pipeline", "-p", help="Pipeline each trial runs (presets set it)."),
    trials: int = typer.Option(4, "--trials", "-n", min=1, help="Trials (grid: the number of grid points)."),
    objective: str | None = typer.Option(None, "--objective", help="An eval metric, or gain_per_usd:<metric> "
                                         "(accuracy gained over the base model per dollar). Default: the preset's "
                                         "(GradES presets: gain_per_usd:eval/mean_accuracy), else eval/mean_accuracy."),
    mode: str = typer.Option("max", "--mode", help="max | min"),
    scheduler: str | None = typer.Option(None, "--scheduler", help="asha: stop trials whose training loss "
                                         "lags (reported at each checkpoint)."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    output_dir: str | None = typer.Option(None, "--output-dir", "-o", help="Where the sweep directory goes."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print the trials' Ray workers' output here "
                                 "(it goes to each trial run's logs/ otherwise)."),
):
    """Sweep hyperparameters with Ray Tune; every trial is scored by the eval stage."""
    # Ray Tune and the pipeline (~4 s of imports): only when a sweep runs
    from harness.sweep import request, run_sweep
    from runtime.output import VERBOSE_ENV

    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # inherited by the trials (Ray workers of a Ray this process starts)
    asked = request(preset, overrides or [], space or [], pipeline, trials, objective, mode, scheduler)
    cfg = load(config, asked.fixed)
    result = run_sweep(cfg, asked.pipeline, [], asked.space, trials, asked.objective, mode, output_dir, console,
                       scheduler)
    console.print(trials_table(result, list(asked.space), asked.objective))
    if result["best"]:
        console.print(f"best: {result['best']['params']} -> {asked.objective} = {result['best']['objective']:.4g}")
    if result.get("grades"):
        console.print(grades_line(result["grades"]))
    console.print(styled("sweep directory: ", (str(result["sweep_dir"]), "bold"),
                         f" (total cost {result['cost_usd']:.5f} USD)"), highlight=False)


def trials_table(result: dict, swept: list[str], objective: str) -> Table:
    table = Table(title=f"sweep {result['sweep_id']} · {objective}")
    for col in ("#", *swept, objective, "cost USD", "status"):
        table.add_column(col, justify="right")
    for i, t in enumerate(result["trials"], 1):
        obj = "" if t["objective"] is None else f"{t['objective']:.4g}"
        table.add_row(str(i), *[f"{t['params'][k]:.4g}" if isinstance(t["params"][k], float) else str(t["params"][k])
                                for k in swept], obj, f"{t['cost_usd']:.5f}",
                      t["status"] if not t["error"] else f"ERROR: {t['error'][:60]}")
    return table


def grades_line(grades: dict) -> str:
    pick = grades["pick"]
    return (f"GradES vs the reference (observing, {grades['reference']['stage_wall_seconds']:.0f} s): "
            + (f"pick {' '.join(grades['pick_overrides'])} -> {pick['speedup']:.2f}x, "
               f"{grades['metric']} {pick['accuracy_delta']:+.4f}" if pick else
               f"no trial within {grades['accuracy_tolerance']} of the reference's accuracy")
            + " (pareto.png)")
