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


def run_stage(ctx, loop, stage_cfg, extra: dict | None = None):
    """Shared driver side of every TRL stage: launch the Ray job, account for devices, return the model."""
    from harness import raytrain
    from harness.cost import device_kind, gpu_alias
    from stages import StageOutput

    cfg = ctx.cfg
    model_out = ctx.stage_dir / "model"
    run_info = {
        "seed": cfg.seed, "model_dir": ctx.latest("model_dir"), "tasks": ctx.latest("tasks"),
        "trust_remote_code": cfg.model.trust_remote_code, "resources": cfg.resources.model_dump(),
        "work_dir": str((ctx.stage_dir / "trainer").resolve()), "stage_dir": str(ctx.stage_dir.resolve()),
        "stage_grades": stage_cfg.grades.model_dump(), "stage_cfg": stage_cfg.model_dump(),
        "mlflow_uri": ctx.tracker.uri, "mlflow_run_id": ctx.mlflow_run_id,
        "mlflow_outbox": str((ctx.stage_dir / "mlflow_outbox_worker.jsonl").resolve()), **(extra or {}),
    }
    devices = raytrain.devices_held(cfg.resources)
    raytrain.ensure_ray(cfg.ray.dashboard)  # starting Ray holds no device: the hold starts with the job
    with ctx.meter.hold(devices, device_kind(cfg.resources.use_gpu)):
        metrics = raytrain.fit(loop, {"run": run_info, "stage": stage_cfg.model_dump()}, cfg.resources,
                               ctx.ray_storage, ctx.ray_name, model_out, max_failures=cfg.failure.max_failures,
                               runtime_env=raytrain.worker_runtime_env(stage_cfg))
    ctx.meter.add_busy(float(metrics.pop("busy_seconds", 0.0)))
    ctx.meter.kind = gpu_alias(metrics.pop("device", "CPU"))  # what the workers actually ran on
    shutil.rmtree(run_info["work_dir"], ignore_errors=True)  # Ray holds the checkpoints that matter
    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    return StageOutput(metrics=scalars, outputs={"model_dir": str(model_out)})
