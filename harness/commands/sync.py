"""`harness sync RUN_DIR`: replay the MLflow writes a run kept locally while the tracking store was down."""
from __future__ import annotations

from pathlib import Path

import typer

from harness.commands.common import console, styled, warn
from runtime.errors import UserError


def sync(
    run_dir: str = typer.Argument(..., help="A run directory whose MLflow writes were kept locally."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="Default: the run's tracking.uri, "
                                            "$MLFLOW_TRACKING_URI or sqlite:///mlflow.db"),
):
    """Replay the MLflow writes a run kept locally while the tracking store was unreachable (safe to rerun: a
    sync stopped part-way resumes, and nothing is written twice)."""
    from pydantic import ValidationError

    from runtime.config import TrackingConfig  # pydantic, and MLflow's client below: only when a run is synced
    from runtime.records import read_mapping_yaml
    from runtime.tracking import outbox_files, store_exists, sync_outbox

    root = Path(run_dir)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory: give a run directory (runs/<run id>)")
    if not outbox_files(root):
        console.print(f"nothing to sync in {root}", highlight=False)
        return
    config = read_mapping_yaml(root / "config.yaml", "run config", "give --tracking-uri, or restore the file") \
        if (root / "config.yaml").exists() and not tracking_uri else {}
    recorded = config.get("tracking") if isinstance(config.get("tracking"), dict) else {}
    try:
        uri = TrackingConfig(uri=tracking_uri or recorded.get("uri")).resolved_uri()
    except ValidationError:
        raise UserError(f"{root / 'config.yaml'}: tracking.uri is not a tracking URI; give --tracking-uri") from None
    if not store_exists(uri):  # a mistyped path would get a new, empty store, and the outbox would move there
        raise UserError(f"no MLflow store at {uri}: give the store this run logged to (--tracking-uri), or, to start "
                        "a new one there, create the file first (an empty file is a new store)")
    notes: list[str] = []
    try:
        done = sync_outbox(uri, root, warn=lambda text: (notes.append(text), warn(text)))
    except Exception as exc:  # unreachable, refused part-way (progress kept), unreadable files
        raise UserError(f"sync to {uri} failed: {exc}") from None
    set_aside = f"; {len(notes)} warning(s) above" if notes else ""
    console.print(styled(("synced", "green"), f" {done} MLflow writes from {root} to {uri}{set_aside}"),
                  highlight=False)
