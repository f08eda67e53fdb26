"""`harness ui`: `mlflow ui` on the run store, and the address of its cost view."""
from __future__ import annotations

import typer

from harness.commands.common import TRACKING_HELP, console, interruptible, reading_store


def ui(
    port: int = typer.Option(5000, "--port", "-p", min=1, max=65535, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    experiment: str = typer.Option("vlmlab", "--experiment", "-e", help="Experiment whose cost view to print."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
):
    """Start `mlflow ui` on the run store and print the cost view's address; Ctrl-C stops it.

    The cost view is the runs table with the accuracy and cost columns shown."""
    from harness import report  # MLflow's client: only when the UI is served
    from runtime.config import TrackingConfig

    interruptible()
    uri = TrackingConfig(uri=tracking_uri).resolved_uri()
    with reading_store(uri):  # unreachable, foreign or not a store: one line naming it
        report.serve_ui(uri, host, port, experiment, say=lambda text: console.print(text, soft_wrap=True,
                                                                                   highlight=False))
