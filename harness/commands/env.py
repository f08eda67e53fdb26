"""`harness env`: package versions and hardware."""
from __future__ import annotations

import json

import typer
from rich.table import Table

from harness.commands.common import console


def env(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Print package versions and hardware."""
    from runtime.manifest import hardware, package_versions  # torch (~1.5 s): only when the hardware is asked for

    info = {"packages": package_versions(), "hardware": hardware()}
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(show_header=False)
    for section, values in info.items():
        for key, value in values.items():
            table.add_row(section, key, str(value))
    console.print(table)
