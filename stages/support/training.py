"""Glue shared by the TRL training stages, run inside Ray Train workers.

Loads the model (optionally with LoRA), turns canonical task rows into TRL's VLM formats, builds the TRL
arguments common to every trainer, times the steps (busy time for the cost report), streams step metrics to the
stage's MLflow run, resumes from Ray's latest checkpoint, and saves the final model on rank 0.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from runtime import raytrain
from runtime.manifest import hardware
from runtime.output import PROGRESS_ENV


def user_turn(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def assistant_turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def load_tasks(tasks: dict, split: str, seed: int, with_task: bool = False):
    """All tasks' canonical rows of ``split``, concatenated and shuffled (``task`` column: vqa/chartqa)."""
    from datasets import concatenate_datasets, load_dataset

    parts = []
    for task, files in tasks.items():
        part = load_dataset("parquet", data_files=files[split], split="train")
        parts.append(part.add_column("task", [task] * len(part)) if with_task else part)
    return concatenate_datasets(parts).shuffle(seed=seed)


def precision_flags(precision: str, use_gpu: bool) -> dict:
    """TRL/transformers precision args: bf16 where the GPU has it, fp16 on older GPUs (T4), fp32 on CPU."""
    import torch

    if precision == "auto":
        if use_gpu and torch.cuda.is_available():
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def common_args(settings, output_dir: Path) -> dict:
    """Arguments every TRL config (SFTConfig, DPOConfig, GRPOConfig) takes the same way."""
    stage, use_gpu = settings.stage, settings.resources.use_gpu
    return dict(
        output_dir=str(output_dir), max_steps=stage.max_steps, per_device_train_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.gradient_accumulation_steps, learning_rate=stage.learning_rate,
        warmup_steps=stage.warmup_steps, lr_scheduler_type=stage.lr_scheduler, weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm, logging_steps=stage.logging_steps,
        save_strategy="steps", save_steps=stage.save_steps, save_total_limit=2,
        seed=settings.seed, data_seed=settings.seed, report_to="none", use_cpu=not use_gpu,
        # TRL defaults gradient checkpointing on: off unless the stage (or resources.fit) asks for it
        activation_checkpointing=stage.gradient_checkpointing, dataloader_num_workers=0,
        # GradES freezes matrices mid-run: DDP must then tolerate parameters that get no gradient
        ddp_find_unused_parameters=stage.grades.enabled, disable_tqdm=False,
        **precision_flags(stage.precision, use_gpu),
    )


RELEASED = "checkpoint_scores/released.json"  # eval.checkpoints=all: when rank 0 handed in the final model
_loop_began: float | None = None  # time.time() this worker process entered its training loop (one loop a process)


def worker_setup(settings) -> Path:
    """Per-worker set-up every training loop starts with: its thread count, deterministic GPU algorithms; returns this
    rank's scratch dir."""
    global _loop_began
    _loop_began = time.time()
    import ray.train
    import torch

    torch.set_num_threads(max(1, int(settings.resources.cpus_per_worker)))
    raytrain.deterministic(settings.resources.use_gpu and torch.cuda.is_available())
    return settings.scratch(ray.train.get_context().get_world_rank())


def start_worker(settings):
    """What every training loop begins with on its Ray Train worker: threads, this rank's scratch directory, the
    model and processor it starts from, the stage's frozen components frozen. Returns (scratch, model, processor,
    trainable parameters per component)."""
    scratch = worker_setup(settings)
    model, processor = load_model(settings.model_dir, settings.trust_remote_code)
    trainable = freeze_components(model, settings.stage.components)
    return scratch, model, processor, trainable


def load_model(model_dir: str, trust_remote_code: bool):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=trust_remote_code,
                                                        use_safetensors=True)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if model.config.model_type == "llava":
        # LLaVA reads hidden states of encoder layers: the encoder's final norm / pooling head never get a
        # gradient, which DDP would otherwise treat as an error
        for name, param in model.named_parameters():
            if "vision_tower." in name and (".post_layernorm." in name or ".head." in name):
                param.requires_grad_(False)
    return model, processor


CONNECTOR_PATTERNS = [r"connector\.", r"multi_modal_projector\.", r"\bmerger\."]


def component_of(name: str) -> str | None:
    """'connector', 'vision' or 'language' for a parameter name."""
    from stages.support.grades import DEFAULT_PATTERNS, group_of

    if group_of(name, {"language": CONNECTOR_PATTERNS}):
        return "connector"
    return group_of(name, {"vision": DEFAULT_PATTERNS["vision"], "language": DEFAULT_PATTERNS["language"]})


def freeze_components(model, components) -> dict[str, int]:
    """requires_grad=False for the frozen components (a ComponentsConfig); returns trainable parameter counts per
    component."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        part = component_of(name)
        if part and getattr(components, part).freeze:
            param.requires_grad_(False)
        if param.requires_grad:
            counts[part or "other"] = counts.get(part or "other", 0) + param.numel()
    return counts


def component_optimizer(trainer, stage):
    """An AdamW with one parameter group per component (its own LR when configured); None if no LR is set.

    ``stage`` is the stage's config section (a TrainStageConfig)."""
    import torch

    lrs = {part: getattr(stage.components, part).lr for part in ("vision", "language", "connector")}
    if all(lr is None for lr in lrs.values()):
        return None
    groups: dict[str, list] = {}
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            groups.setdefault(component_of(name) or "other", []).append(param)
    base = stage.learning_rate
    param_groups = [{"params": params, "lr": lrs.get(part) or base, "name": part} for part, params in groups.items()]
    return torch.optim.AdamW(param_groups, lr=base, weight_decay=stage.weight_decay)


def peft_config(lora):
    if not lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def start_end(values: list[float]) -> tuple[float, float]:
    """Means over the first and the last 10 % of ``values`` (at least one value each): where a logged curve began
    and where it ended, steadier than its first and last points."""
    k = max(1, len(values) // 10)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def loss_summary(history: list[dict], prefix: str) -> dict[str, float]:
    """Mean training loss over the first and the last 10% of logged steps."""
    losses = [h["loss"] for h in history if "loss" in h]
    if not losses:
        return {}
    start, end = start_end(losses)
    return {f"{prefix}/loss_start": start, f"{prefix}/loss_end": end}


def grades_callback(grades, log):
    """The GradES callback for these settings (GradESSettings), or None when disabled; ``log(metrics, step)``
    records its metrics."""
    if not grades.enabled:
        return None
    from stages.support.grades import GradESCallback

    return GradESCallback(grades.vision_tau, grades.language_tau, grades.alpha, grades.compute_interval,
                          grades.max_frozen_ratio, grades.patterns, log)


def resumed_step(checkpoint: str | None) -> int:
    """The global step a resumed run started from (0 for a fresh start)."""
    if checkpoint is None:
        return 0
    state = Path(checkpoint) / "trainer_state.json"
    return int(json.loads(state.read_text())["global_step"]) if state.exists() else 0


def resume_checkpoint(scratch: Path) -> str | None:
    """The HF checkpoint inside Ray's latest checkpoint, when Ray restarted this worker group.

    Ray merges every rank's upload into one checkpoint (rank 0's model, optimizer and trainer state, each rank's
    RNG state); each rank copies it into its own scratch directory, removed with the stage.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    dest = scratch / "resumed"
    shutil.rmtree(dest, ignore_errors=True)  # left by an earlier restart: never mix two checkpoints' files
    path = Path(ckpt.to_directory(str(dest))) / "checkpoint"
    return str(path) if path.exists() else None


def rank_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (all ranks must call it)."""
    import ray
    import torch.distributed as dist

    mine = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, mine)
    return nodes


def write_grades_record(grades, settings, rank: int) -> None:
    """Every rank's freeze decisions (so anyone can check the ranks agreed); rank 0 adds the history and plot."""
    stage_dir = Path(settings.stage_dir)
    (stage_dir / f"grades_events_rank{rank}.json").write_text(json.dumps(grades.events, indent=1))
    if rank != 0:
        return
    (stage_dir / "grades_history.json").write_text(json.dumps(grades.history()))
    plot = stage_dir / "grades_convergence.png"
    grades.plot(str(plot))
    try:
        from mlflow.tracking import MlflowClient
        MlflowClient(tracking_uri=settings.mlflow_uri).log_artifact(settings.mlflow_run_id, str(plot))
    except Exception:  # store unreachable: the plot stays in the stage directory
        pass


def train_and_save(trainer, processor, settings, scratch: Path, summarize=None) -> None:
    """Run ``trainer`` under Ray; rank 0 reports the final model (LoRA merged) as the last checkpoint.

    Rank-safe on shared storage by construction: each rank's HF ``output_dir`` is its own ``scratch`` (Ray's
    report callback copies from there), only rank 0 streams step metrics, every file a rank writes is named
    after it. ``summarize(history) -> dict`` adds stage-specific scalars computed from the trainer's log history.
    """
    import tempfile

    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.huggingface.transformers import prepare_trainer

    from stages.support.callbacks import CheckpointReporter, MlflowStepLogger, ProgressReporter, StepTimer

    assert Path(trainer.args.output_dir) == scratch, "a rank's HF output_dir must be its own scratch directory"
    prefix, rank = settings.prefix, ray.train.get_context().get_world_rank()
    optimizer = component_optimizer(trainer, settings.stage)
    if optimizer is not None:
        trainer.optimizer = optimizer  # Trainer keeps a given optimizer and builds the LR schedule over it
    timer = StepTimer()
    logger = MlflowStepLogger(settings.mlflow_uri, settings.mlflow_run_id, prefix, settings.mlflow_outbox) \
        if rank == 0 else None
    callbacks = [CheckpointReporter(settings.score_checkpoints), timer] + ([logger] if logger else [])
    if rank == 0 and os.environ.get(PROGRESS_ENV):  # the driver's console shows this rank's progress
        callbacks.append(ProgressReporter(os.environ[PROGRESS_ENV], prefix))
    grades = grades_callback(settings.stage.grades, logger.log if logger else None)
    if grades is not None:
        callbacks.insert(0, grades)
    for cb in callbacks:
        trainer.add_callback(cb)
    trainer = prepare_trainer(trainer)
    timer.instrument(trainer)
    resume = resume_checkpoint(scratch)
    try:
        out = trainer.train(resume_from_checkpoint=resume)
    finally:
        if logger:
            logger.close()
    trained_at = time.time()
    use_gpu = settings.resources.use_gpu and torch.cuda.is_available()
    metrics = {
        f"{prefix}/train_loss": out.training_loss, f"{prefix}/steps": out.global_step,
        f"{prefix}/train_samples_per_second": out.metrics.get("train_samples_per_second", 0.0),
        f"{prefix}/backward_seconds": timer.backward, f"{prefix}/step_seconds": timer.busy,
        f"{prefix}/resumed_from_step": resumed_step(resume), f"{prefix}/first_step_unix": timer.first_step_at or 0.0,
        "device": torch.cuda.get_device_name(0) if use_gpu else "CPU",
        "hardware": json.dumps(hardware()), "node_ids": json.dumps(rank_nodes()),
    }
    if use_gpu:  # what torch allocated at its peak: the number the memory plan predicts (stages/support/memory.py)
        metrics[f"{prefix}/max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    metrics.update(loss_summary(trainer.state.log_history, prefix))
    if summarize is not None:
        metrics.update(summarize(trainer.state.log_history))
    if grades is not None:
        metrics.update({f"{prefix}/{k}": v for k, v in grades.summary().items()})
        write_grades_record(grades, settings, rank)
    if rank != 0:
        ray.train.report(metrics)
        return
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    # this rank's held time (runtime.cost.PHASES): stepping began at first_step_at (all before it is start); after
    # training ended, the driver counts the rest of the hold (the final model's merge and save, Ray's upload, the copy
    # to the stage directory) as saving
    metrics["phases"] = json.dumps({"began": timer.first_step_at or trained_at, "ended": trained_at,
                                    "loop_began": _loop_began or trained_at, "steps": timer.busy,
                                    "saving": timer.saving})
    with tempfile.TemporaryDirectory() as tmp:  # node-local: Ray uploads it to the stage's storage
        getattr(model, "module", model).save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    if settings.score_checkpoints:  # Ray Train now waits for the checkpoints' scoring, no longer for the ranks
        released = Path(settings.stage_dir) / RELEASED
        released.parent.mkdir(parents=True, exist_ok=True)
        released.write_text(json.dumps({"released": time.time()}))
