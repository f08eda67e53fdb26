"""`harness gc`: free an output dir, keeping the newest runs per pipeline and what they use."""
from __future__ import annotations

from pathlib import Path

import typer

from harness import gc as collector
from harness.commands.common import console
from runtime.errors import UserError


def gc(
    output_dir: str = typer.Option("runs", "--output-dir", "-o", help="The output dir to clean."),
    keep: int = typer.Option(5, "--keep", min=1, help="Runs to keep per pipeline (the newest)."),
    apply: bool = typer.Option(False, "--apply", help="Delete; without it, only say what would go."),
):
    """Free an output dir: keep the last N runs per pipeline and the cache entries and runs they use."""
    root = Path(output_dir).expanduser()
    if "://" in output_dir or not root.is_dir():
        raise UserError(f"--output-dir: {output_dir} is not a local directory; give the directory `harness run` "
                        "wrote to (a bucket's checkpoints are deleted in the bucket)")
    plan = collector.plan(root, keep)
    mb = plan.size() / 1e6
    console.print(f"{'freeing' if apply else 'would free'} {mb:.1f} MB: {len(plan.runs)} run dir(s), "
                  f"{len(plan.entries)} cache entr(y/ies), {len(plan.storage)} Ray storage dir(s), "
                  f"{len(plan.answers)} eval answer file(s); "
                  f"keeping {plan.kept_runs} run(s)", highlight=False)
    for path in plan.paths:
        console.print(f"  {path}", highlight=False)
    if apply:
        collector.apply(plan)
    elif plan.paths:
        console.print("dry run: rerun with --apply to delete")
