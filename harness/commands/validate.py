"""`harness validate CONFIG`: check a config (and overrides) without running anything."""
from __future__ import annotations

import typer

from harness.commands.common import CONFIG_HELP, console, load, styled, warn


def validate(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides"),
):
    """Check a config (and overrides) without running anything: keys, values, pipelines, GRPO rewards (read, not
    imported), the device's price, local data sources."""
    from harness.inputs import check_inputs  # the stages' checks (datasets, the model's config): only here
    from stages import STAGES

    cfg = load(config, overrides)
    stages = list(dict.fromkeys(name for chain in cfg.pipelines.values() for name in chain))
    for name in stages:
        STAGES[name].check(cfg)
    check_inputs(cfg, stages, say=warn)
    console.print(styled(("ok", "green"), f": {config} (pipelines: {', '.join(cfg.pipelines)}; "
                         f"config sha256 {cfg.config_hash()[:12]})"), highlight=False)
