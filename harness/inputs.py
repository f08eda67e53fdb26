"""Pre-flight checks of a run's inputs, after its config validates and before its first stage: the device it will use
has a price, the local data sources are readable in their layout, and secrets Ray itself would store are flagged."""
from __future__ import annotations

import os
from pathlib import Path

from runtime.config import TRAINING_STAGES
from runtime.cost import cluster_gpus, gpu_alias
from runtime.errors import ConfigError
from runtime.raytrain import ensure_ray, require_resources, room_for, worker_bundle
from runtime.secrets import is_secret_key, redact_text
from stages.support import datasets as dsets
from stages.support import fit


def check_data_sources(cfg) -> None:
    """Every local task source: each split loads and its first row maps onto the canonical columns (image decoded).
    JSON layouts are read whole, so a bad entry anywhere is named by file and row. Raises DataError."""
    def local(src) -> bool:  # synthetic data is generated, hub data checked on fetch
        return src.source != "synthetic" and src.format != "hub" and Path(src.source).expanduser().exists()

    with dsets.quiet():  # a check prints nothing but its error
        for task, spec in cfg.data.tasks.items():
            for split_key in ("train", "test"):
                if local(spec.train_from if split_key == "train" and spec.train_from else spec):
                    rows, origin, layout = dsets.load_split(spec, split_key, None)
                    dsets.canonicalize(rows, task, spec.columns, origin, 1, layout)


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
    import ray  # Ray (~1.5 s of imports): for the pre-flight of a run, not of `harness --help`

    if not (os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        check_local_room(cfg.resources)
        return
    ensure_ray(cfg.ray.dashboard)
    require_resources(cfg.resources, "this run")


def check_local_room(resources) -> None:
    """A local Ray is this machine and never grows: workers it cannot hold are bad input now, not after Ray started
    (and, on a cluster, the placement wait stays: an autoscaler may grow it)."""
    machine = {"CPU": float(os.cpu_count() or 1)}
    if resources.use_gpu:
        import torch

        machine["GPU"] = float(torch.cuda.device_count())
        if not machine["GPU"]:
            return  # no GPU at all: the device check names that, with its own fix
    bundle = worker_bundle(resources)
    if room_for(bundle, [machine]) < resources.workers:
        want = ", ".join(f"{k}: {v:g}" for k, v in bundle.items())
        have = ", ".join(f"{k} {v:g}" for k, v in machine.items())
        raise ConfigError(f"resources.workers: {resources.workers} worker(s) of {{{want}}} do not fit this machine "
                          f"({have}), and a local Ray never grows; lower resources.workers / cpus_per_worker / "
                          "gpus_per_worker, or submit to a cluster (RAY_ADDRESS)")


def planned_devices(cfg) -> set[str]:
    """The device models the run's stages will use, known before the first starts: CPU; the GPUs torch sees here;
    or, attached to a Ray cluster (RAY_ADDRESS or an initialised Ray), the GPU models of its nodes."""
    if not cfg.resources.use_gpu:
        return {"CPU"}
    import ray  # Ray and torch load only for a GPU run's pre-flight
    import torch

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        ensure_ray(cfg.ray.dashboard)
        return cluster_gpus(ray.nodes())

    if not torch.cuda.is_available():
        raise ConfigError("resources.use_gpu is true but torch sees no CUDA GPU on this machine: install a CUDA build "
                          "of torch, or set resources.use_gpu=false")
    return {gpu_alias(torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())}


def check_priced(cfg) -> set[str]:
    """Pre-flight, before the first stage: every device the run may use has a price (or cost.price_per_hour is
    set). Returns the devices. Raises ConfigError."""
    if cfg.cost.price_per_hour is not None:
        return set()
    models = planned_devices(cfg)
    if not models:
        raise ConfigError("resources.use_gpu: the Ray cluster has no live GPU node, so the device and its price are "
                          "unknown: start the GPU nodes first, or set cost.price_per_hour=<USD per device-hour>")
    missing = sorted(models - set(cfg.cost.prices))
    if missing:
        raise ConfigError(f"cost: no price for device {', '.join(missing)} (priced: {', '.join(cfg.cost.prices)}): "
                          f"set cost.prices.{missing[0]}=<USD per device-hour> or cost.price_per_hour=<USD>")
    return models


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


def fit_run(cfg, stages: list[str], say=print) -> tuple[object, dict]:
    """resources.fit: the config with each device stage's batch sizes fitted to the worker's device, and the record of
    the choices ({} where the fit does not apply: fit off, a CPU run without resources.device_memory_gb)."""
    device = fit.check_device_memory(cfg)
    if device is None or not any(s in TRAINING_STAGES or s == "eval" for s in stages):
        return cfg, {}
    return fit.fit_to_device(cfg, stages, *device, say=say)
