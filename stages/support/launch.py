"""Driver side of the TRL training stages: config-time checks and launching the Ray Train job.

The worker side (what runs inside each Ray Train worker) is `stages/support/training.py`.
"""
from __future__ import annotations

import shutil


def check_grades(cfg, stage: str) -> None:
    """Fail at config time when a GradES pattern group matches no weight matrix of the model."""
    settings = getattr(cfg, stage).grades
    if not settings.enabled:
        return
    from harness.errors import ConfigError
    from stages.support.grades import DEFAULT_PATTERNS, group_of  # imports the Trainer stack (~1.5 s)

    names = parameter_names(cfg)
    if names is None:  # a hub id not in the local cache: checked when training starts
        return
    patterns = settings.patterns or DEFAULT_PATTERNS
    for group in ("vision", "language"):
        if group in patterns and not any(group_of(n, {group: patterns[group]}) == group for n in names):
            raise ConfigError(f"{stage}.grades.patterns.{group}: no parameter of the model matches "
                              f"{patterns[group]}")


def parameter_names(cfg) -> list[str] | None:
    """2-D parameter names of the configured model, built on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from stages.support import tinyvlm

    if cfg.model.source == "tiny":
        config = tinyvlm.model_config(cfg.model.tiny, cfg.data.image_size, cfg.model.tiny.vocab_size)
    else:
        try:
            config = AutoConfig.from_pretrained(cfg.model.source, trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError):
            return None
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return [n for n, p in model.named_parameters() if p.dim() == 2]


def run_stage(ctx, loop, stage_cfg, inputs: dict[str, str] | None = None):
    """Shared driver side of every TRL stage: launch the Ray job, account for devices, return the model."""
    import json

    from harness import raytrain
    from harness.cost import device_kind, gpu_alias
    from stages import StageOutput
    from stages.support.settings import TrainSettings

    cfg = ctx.cfg
    model_out = ctx.stage_dir / "model"
    settings = TrainSettings(
        stage=stage_cfg, prefix=ctx.name, seed=cfg.seed, resources=cfg.resources, model_dir=ctx.latest("model_dir"),
        tasks=ctx.latest("tasks"), trust_remote_code=cfg.model.trust_remote_code,
        stage_dir=str(ctx.stage_dir.resolve()), mlflow_uri=ctx.tracker.uri, mlflow_run_id=ctx.mlflow_run_id,
        inputs=inputs or {})
    devices = raytrain.devices_held(cfg.resources)
    raytrain.ensure_ray(cfg.ray.dashboard)  # starting Ray holds no device: the hold starts with the job
    with ctx.meter.hold(devices, device_kind(cfg.resources.use_gpu)):
        metrics = raytrain.fit(loop, settings, ctx.ray_storage, ctx.ray_name, model_out,
                               max_failures=cfg.failure.max_failures,
                               runtime_env=raytrain.worker_runtime_env(stage_cfg))
    ctx.meter.add_busy(float(metrics.pop("busy_seconds", 0.0)))
    ctx.meter.kind = gpu_alias(metrics.pop("device", "CPU"))  # what the workers actually ran on
    hardware = json.loads(metrics.pop("hardware", "null"))
    node_ids = json.loads(metrics.pop("node_ids", "[]"))
    shutil.rmtree(settings.scratch_root, ignore_errors=True)  # Ray holds the checkpoints that matter
    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    return StageOutput(metrics=scalars, outputs={"model_dir": str(model_out)},
                       ran_on={"rank_nodes": node_ids, "device": ctx.meter.kind, "hardware": hardware})
