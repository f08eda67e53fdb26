"""Driver side of the TRL training stages: config-time checks and launching the Ray Train job.

The worker side (what runs inside each Ray Train worker) is `stages/support/training.py`.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from runtime import raytrain
from runtime.architectures import architecture
from runtime.atomic import atomic_write
from runtime.cost import device_model, gpu_alias
from runtime.errors import ConfigError, UserError
from stages import StageOutput
from stages.eval import bill_scored_checkpoints, checkpoint_scorer
from stages.model import check_weights
from stages.support import smolvlm, tinyvlm
from stages.support.settings import TrainSettings
from stages.support.training import RELEASED


def check_grades(cfg, stage: str) -> None:
    """Fail at config time when a GradES pattern group matches no weight matrix of the model."""
    settings = getattr(cfg, stage).grades
    if not settings.enabled:
        return
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

    if cfg.model.source == "tiny":
        config = tinyvlm.model_config(cfg.model.tiny, cfg.data.image_size, cfg.model.tiny.vocab_size)
    elif cfg.model.source == "random":
        config = smolvlm.model_config(architecture(cfg.model.architecture))
    else:
        try:
            config = AutoConfig.from_pretrained(cfg.model.source, trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError):
            return None
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return [n for n, p in model.named_parameters() if p.dim() == 2]


def _intact(checkpoint: Path) -> str | None:
    """Why a Ray checkpoint cannot be resumed from (missing, unreadable weights or trainer state), or None."""

    hf = checkpoint / "checkpoint" if (checkpoint / "checkpoint").is_dir() else checkpoint
    if not hf.is_dir():
        return "missing"
    try:
        check_weights(hf)
        if (hf / "trainer_state.json").exists():
            json.loads((hf / "trainer_state.json").read_text())
    except (UserError, OSError, ValueError) as exc:
        return str(exc).removeprefix("model.source: ")
    return None


def usable_checkpoints(storage: Path, say) -> None:
    """Before a training stage starts on its Ray storage: checkpoints that are missing or damaged leave Ray's list,
    so it resumes from the newest intact one; with none left the storage is set aside and the stage starts over.
    One warning either way, never a failure loop."""
    snapshot = storage / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return
    try:
        state = json.loads(snapshot.read_text())
        results = list(state["checkpoint_results"])
        problems = {r["checkpoint_dir_name"]: _intact(storage / r["checkpoint_dir_name"]) for r in results}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        state, results, problems = None, [], {snapshot.name: f"unreadable ({exc})"}
    bad = {name: why for name, why in problems.items() if why}
    if not bad:
        return
    good = [r for r in results if not problems[r["checkpoint_dir_name"]]]
    damaged = "; ".join(f"{name}: {why}" for name, why in bad.items())
    if not good:
        aside = storage.with_name(f"{storage.name}.damaged-{int(time.time())}")
        storage.rename(aside)
        say(f"warning: no intact checkpoint to resume from ({damaged}); the stage starts over from step 0 (the old "
            f"checkpoints are kept in {aside})")
        return
    indices = state.get("checkpoint_report_indices", [])
    if len(indices) == len(results):
        state["checkpoint_report_indices"] = [i for i, r in zip(indices, results, strict=True) if r in good]
    state["checkpoint_results"], state["latest_checkpoint_result"] = good, good[-1]
    pending = state.get("pending_training_results", [])  # checkpoints awaiting their scoring (eval.checkpoints=all)
    specs = state.get("pending_validation_specs", [])
    if len(pending) == len(specs):  # Ray looks each up among the results it keeps: a dropped one must go too
        kept = [(r, v) for r, v in zip(pending, specs, strict=True) if r in good]
        state["pending_training_results"] = [r for r, _ in kept]
        state["pending_validation_specs"] = [v for _, v in kept]
    atomic_write(snapshot, json.dumps(state))
    say(f"warning: damaged checkpoint ({damaged}); resuming from {good[-1]['checkpoint_dir_name']}")


def _released(stage_dir: Path, ended: float) -> float:
    """When rank 0 handed in the final model (stages/support/training.py RELEASED), or ``ended`` (training's end)
    where the file is missing or damaged."""
    try:
        return float(json.loads((stage_dir / RELEASED).read_text())["released"])
    except (OSError, ValueError, KeyError, TypeError):
        return ended


def _checkpoint_scorer(ctx, settings: TrainSettings):
    """eval.checkpoints=all: Ray Train's validation of each checkpoint the stage saves (stages/eval.py), said on the
    console."""
    ctx.say(f"eval: scoring each checkpoint {ctx.name} saves before its end (every {settings.stage.save_steps} "
            "steps) on workers beyond its ranks, as they are free (at the latest once it has trained)")
    return checkpoint_scorer(ctx.cfg, ctx.name, settings.tasks, settings.model_dir, ctx.stage_dir)


def run_stage(ctx, loop, stage_cfg, inputs: dict[str, str] | None = None):
    """Shared driver side of every TRL stage: launch the Ray job, account for devices, return the model."""

    cfg = ctx.cfg
    model_out = ctx.stage_dir / "model"
    settings = TrainSettings(
        stage=stage_cfg, prefix=ctx.name, seed=cfg.seed, resources=cfg.resources, model_dir=ctx.latest("model_dir"),
        tasks=ctx.latest("tasks"), trust_remote_code=cfg.model.trust_remote_code,
        stage_dir=str(ctx.stage_dir.resolve()), mlflow_uri=ctx.tracker.uri, mlflow_run_id=ctx.mlflow_run_id,
        inputs=inputs or {}, score_checkpoints=ctx.score_checkpoints and not raytrain.in_tune_trial())
    if isinstance(ctx.ray_storage, Path):  # in a bucket, objects are never torn and Ray lists only whole uploads
        usable_checkpoints(ctx.ray_storage / ctx.ray_name, ctx.say)
    devices = raytrain.devices_held(cfg.resources)
    raytrain.ensure_ray(cfg.ray.dashboard)  # starting Ray holds no device: the hold starts with the job
    scorer = _checkpoint_scorer(ctx, settings) if settings.score_checkpoints else None
    with ctx.meter.hold(devices, device_model(cfg.resources.use_gpu)):
        metrics = raytrain.fit(loop, settings, ctx.ray_storage, ctx.ray_name, model_out,
                               max_failures=cfg.failure.max_failures,
                               runtime_env=raytrain.worker_runtime_env(stage_cfg), validation=scorer)
    # rank 0's phases stand for every rank's (they step in lockstep); the hold's tail after training is saving
    phases = json.loads(metrics.pop("phases"))
    began, ended, loop_began = phases.pop("began"), phases.pop("ended"), phases.pop("loop_began")
    ctx.meter.add_worker(began, phases, devices)
    copied = metrics.pop("model_copy_seconds")
    released = _released(ctx.stage_dir, ended) if scorer is not None else ctx.meter.hold_ended - copied
    # after the final model's handover, fit waited for checkpoint scoring only: idle (the copy is saving again)
    ctx.meter.add("saving", (released - ended + copied) * devices)
    # start, in two: Ray Train placing the worker group and starting its processes, then the loop's imports, model
    # and data load and trainer build up to the first step (wall seconds; held device-seconds are these x devices)
    metrics[f"{ctx.name}/start_placement_seconds"] = loop_began - ctx.meter.hold_began
    metrics[f"{ctx.name}/start_load_seconds"] = began - loop_began
    ctx.meter.device = gpu_alias(metrics.pop("device", "CPU"))  # what the workers actually ran on
    scored = None
    if scorer is not None:  # after the training's own accounting: these held other devices, beside the ranks'
        saved = list(range(stage_cfg.save_steps, int(metrics[f"{ctx.name}/steps"]), stage_cfg.save_steps))
        scored = bill_scored_checkpoints(ctx.name, ctx.stage_dir, ctx.meter, devices, ended, released, saved,
                                         ctx.say)
    hardware = json.loads(metrics.pop("hardware", "null"))
    node_ids = json.loads(metrics.pop("node_ids", "[]"))
    shutil.rmtree(settings.scratch_root, ignore_errors=True)  # Ray holds the checkpoints that matter
    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    outputs = {"model_dir": str(model_out)} | ({"checkpoint_scores": scored} if scored is not None else {})
    return StageOutput(metrics=scalars, outputs=outputs,
                       ran_on={"rank_nodes": node_ids, "device": ctx.meter.device, "hardware": hardware})
