"""`harness eval MODEL`: score a checkpoint you already have, recorded like any run."""
from __future__ import annotations

import typer

from harness.commands.common import CONFIG_HELP, VERBOSE_HELP, console, load
from harness.commands.run import run_and_summarize


def eval_(
    model: str = typer.Argument(..., help="A checkpoint directory or hub id to score."),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides, e.g. eval.batch_size=32"),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated tasks (default: the config's)."),
    protocol: str | None = typer.Option(None, "--protocol", help="short or lmms (default: the config's)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Score at most this many items per task."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP + " Default: the config.yaml of "
                                      "the run MODEL was trained in, else the default preset."),
    output_dir: str | None = typer.Option(None, "--output-dir", "-o", help="Where run directories go."),
    force: bool = typer.Option(False, "--force", help="Recompute every stage (ignore the stage cache)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP),
):
    """Score a checkpoint you already have (data + model + eval, recorded like any run): how a base model or a
    colleague's checkpoint gets on the leaderboard."""
    from runtime.config import eval_overrides  # pydantic's models: not paid by `harness --help`

    def load_config():
        found, extra = eval_overrides(model, config, tasks, protocol, limit)
        if found:
            console.print(f"data and eval settings from {found}", highlight=False)
        return load(config or found, [*extra, *(overrides or [])])

    run_and_summarize(load_config, "eval", output_dir, force, verbose)
