"""`harness estimate PIPELINE --device ...`: predicted wall time and dollars per device before renting one."""
from __future__ import annotations

import json

import typer

from harness.commands.common import CONFIG_HELP, console, err, interruptible, load, styled

# calibration steps per training stage: with 20, the first steps' warm-up and a log every 5 steps made the default
# sft step 40 % slower than in the real run (results/estimate.md)
DEFAULT_STEPS = 40


def estimate(
    pipeline: str = typer.Argument("sft", help="Pipeline name from the config's `pipelines`."),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides, e.g. sft.max_steps=3000"),
    device: list[str] | None = typer.Option(None, "--device", "-d", help="T4, L4, A10G, A100, H100, H200 or cpu "
                                            "(this machine); repeatable or comma-separated. Default: all."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", min=2, help="Calibration steps per training stage."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Predict a pipeline's wall time and cost per device from a short calibration run on this machine.

    The calibration runs the pipeline shortened (a few steps of each training stage, a slice of eval) in a
    temporary directory with its own MLflow store; other devices are scaled by FLOPs, peak and an assumed MFU
    (harness/estimate.py). The assumptions are printed under the tables."""
    from harness.estimate import estimate as predict  # the pipeline, Ray and torch: only when estimating
    from harness.estimate import parse_devices, render

    interruptible()
    devices = parse_devices(device)
    cfg = load(config, overrides)
    try:
        result = predict(cfg, pipeline, devices, steps, console=None if as_json else console)
    except KeyboardInterrupt:
        err.print(styled(("interrupted", "bold red"), ": nothing was kept (the calibration ran in a temporary "
                         "directory)"))
        raise typer.Exit(code=130) from None
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        render(result, console)
