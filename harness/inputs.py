"""Pre-flight checks of a run's inputs, after its config validates and before its first stage: the device it will use
has a price, the local data sources are readable in their layout, and secrets Ray itself would store are flagged."""
from __future__ import annotations

from runtime.config import TRAINING_STAGES
from runtime.cost import check_priced
from runtime.secrets import is_secret_key, redact_text



def check_data_sources(cfg) -> None:
    """Every local task source: each split loads and its first row maps onto the canonical columns (image decoded).
    JSON layouts are read whole, so a bad entry anywhere is named by file and row. Raises DataError."""
    from pathlib import Path

    import datasets

    from stages.support import datasets as dsets

    def local(src) -> bool:  # synthetic data is generated, hub data checked on fetch
        return src.source != "synthetic" and src.format != "hub" and Path(src.source).expanduser().exists()

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a check prints nothing but its error
    try:
        for kind, spec in cfg.data.tasks.items():
            for split_key in ("train", "test"):
                if local(spec.train_from if split_key == "train" and spec.train_from else spec):
                    rows, origin, layout = dsets.load_split(spec, split_key, None)
                    dsets.canonicalize(rows, kind, spec.columns, origin, 1, layout)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def runtime_env_secrets(cfg, stages: list[str]) -> list[str]:
    """`<stage>.runtime_env.env_vars.<NAME>` entries that hold secrets."""
    found = []
    for stage in (s for s in stages if s in TRAINING_STAGES):
        for name, value in getattr(cfg, stage).runtime_env.env_vars.items():
            if is_secret_key(name) or redact_text(value) != value:
                found.append(f"{stage}.runtime_env.env_vars.{name}")
    return found


def check_placement(cfg) -> None:
    """Attached to a Ray cluster: it has (or, autoscaling, grows within resources.placement_timeout_s) room for the
    stage workers, so the GPU models priced next are the ones the stages will get. A local run starts Ray later."""
    import os

    import ray

    if not (os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        return
    from runtime.raytrain import ensure_ray, require_resources

    ensure_ray(cfg.ray.dashboard)
    require_resources(cfg.resources, "this run")


def check_inputs(cfg, stages: list[str], say=print) -> None:
    """Pre-flight for a run of ``stages``: raises UserError (before any work), warns through ``say``."""
    check_placement(cfg)
    check_priced(cfg)
    if "data" in stages:
        check_data_sources(cfg)
    for key in runtime_env_secrets(cfg, stages):
        say(f"warning: {key} holds a secret; vlmlab keeps it out of everything it writes, but Ray itself stores a "
            "runtime_env (in its GCS, job and dashboard records, and logs); prefer setting it in the Ray nodes' own "
            "environment")
