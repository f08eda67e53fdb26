"""Glue shared by the TRL training stages, run inside Ray Train workers.

Loads the model (optionally with LoRA), turns canonical task rows into TRL's VLM formats, builds the TRL
arguments common to every trainer, times the steps (busy time for the cost report), streams step metrics to the
stage's MLflow run, resumes from Ray's latest checkpoint, and saves the final model on rank 0.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def user_turn(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def assistant_turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def load_tasks(tasks: dict, split: str, seed: int, with_task: bool = False):
    """All tasks' canonical rows of ``split``, concatenated and shuffled (``task`` column: vqa/chartqa)."""
    from datasets import concatenate_datasets, load_dataset

    parts = []
    for kind, files in tasks.items():
        part = load_dataset("parquet", data_files=files[split], split="train")
        parts.append(part.add_column("task", [kind] * len(part)) if with_task else part)
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


def common_args(stage_cfg: dict, run: dict, output_dir: Path) -> dict:
    """Arguments every TRL config (SFTConfig, DPOConfig, GRPOConfig) takes the same way."""
    use_gpu = run["resources"]["use_gpu"]
    return dict(
        output_dir=str(output_dir), max_steps=stage_cfg["max_steps"],
        per_device_train_batch_size=stage_cfg["batch_size"],
        gradient_accumulation_steps=stage_cfg["gradient_accumulation_steps"],
        learning_rate=stage_cfg["learning_rate"], warmup_steps=stage_cfg["warmup_steps"],
        lr_scheduler_type=stage_cfg["lr_scheduler"], weight_decay=stage_cfg["weight_decay"],
        max_grad_norm=stage_cfg["max_grad_norm"], logging_steps=stage_cfg["logging_steps"],
        save_strategy="steps", save_steps=stage_cfg["save_steps"], save_total_limit=2,
        seed=run["seed"], data_seed=run["seed"], report_to="none", use_cpu=not use_gpu,
        activation_checkpointing=False, dataloader_num_workers=0,  # TRL defaults gradient_checkpointing on
        # GradES freezes matrices mid-run: DDP must then tolerate parameters that get no gradient
        ddp_find_unused_parameters=stage_cfg["grades"]["enabled"], disable_tqdm=False,
        **precision_flags(stage_cfg["precision"], use_gpu),
    )


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


def freeze_components(model, components: dict) -> dict[str, int]:
    """requires_grad=False for the frozen components; returns trainable parameter counts per component."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        part = component_of(name)
        if part and components[part]["freeze"]:
            param.requires_grad_(False)
        if param.requires_grad:
            counts[part or "other"] = counts.get(part or "other", 0) + param.numel()
    return counts


def component_optimizer(trainer, stage_cfg: dict):
    """An AdamW with one parameter group per component (its own LR when configured); None if no LR is set."""
    import torch

    components = stage_cfg["components"]
    if all(c["lr"] is None for c in components.values()):
        return None
    groups: dict[str, list] = {}
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            groups.setdefault(component_of(name) or "other", []).append(param)
    base = stage_cfg["learning_rate"]
    param_groups = [{"params": params, "lr": (components.get(part, {}).get("lr") or base), "name": part}
                    for part, params in groups.items()]
    return torch.optim.AdamW(param_groups, lr=base, weight_decay=stage_cfg["weight_decay"])


def peft_config(lora: dict):
    if not lora["enabled"]:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], task_type="CAUSAL_LM")


def loss_summary(history: list[dict], prefix: str) -> dict[str, float]:
    """Mean training loss over the first and the last 10% of logged steps."""
    losses = [h["loss"] for h in history if "loss" in h]
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    return {f"{prefix}/loss_start": sum(losses[:k]) / k, f"{prefix}/loss_end": sum(losses[-k:]) / k}


def grades_callback(run: dict, log):
    """The GradES callback for this stage, or None when disabled; ``log(metrics, step)`` records its metrics."""
    settings = run["stage_grades"]
    if not settings["enabled"]:
        return None
    from stages.support.grades import GradESCallback

    return GradESCallback(settings["vision_tau"], settings["language_tau"], settings["alpha"],
                          settings["compute_interval"], settings["max_frozen_ratio"], settings["patterns"], log)


def resumed_step(checkpoint: str | None) -> int:
    """The global step a resumed run started from (0 for a fresh start)."""
    if checkpoint is None:
        return 0
    state = Path(checkpoint) / "trainer_state.json"
    return int(json.loads(state.read_text())["global_step"]) if state.exists() else 0


def resume_checkpoint(work_dir: str) -> str | None:
    """The HF checkpoint inside Ray's latest checkpoint, when Ray restarted this worker group.

    Copied into the stage's work directory (removed with it), not a temporary directory nobody deletes.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    dest = Path(work_dir) / f"resumed_rank{ray.train.get_context().get_world_rank()}"
    shutil.rmtree(dest, ignore_errors=True)  # left by an earlier restart: never mix two checkpoints' files
    path = Path(ckpt.to_directory(str(dest))) / "checkpoint"
    return str(path) if path.exists() else None


def train_and_save(trainer, processor, run: dict, prefix: str, summarize=None) -> None:
    """Run ``trainer`` under Ray; rank 0 reports the final model (LoRA merged) as the last checkpoint.

    ``summarize(history) -> dict`` adds stage-specific scalars (e.g. reward margin at start/end) computed
    from the trainer's log history.
    """
    import tempfile

    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    from stages.support.callbacks import MlflowStepLogger, StepTimer

    optimizer = component_optimizer(trainer, run["stage_cfg"])
    if optimizer is not None:
        trainer.optimizer = optimizer  # Trainer keeps a given optimizer and builds the LR schedule over it
    timer = StepTimer()
    logger = MlflowStepLogger(run["mlflow_uri"], run["mlflow_run_id"], prefix, run["mlflow_outbox"])
    callbacks = [RayTrainReportCallback(), timer, logger]
    grades = grades_callback(run, logger.log)
    if grades is not None:
        callbacks.insert(0, grades)
    for cb in callbacks:
        trainer.add_callback(cb)
    trainer = prepare_trainer(trainer)
    timer.instrument(trainer)
    resume = resume_checkpoint(run["work_dir"])
    try:
        out = trainer.train(resume_from_checkpoint=resume)
    finally:
        logger.close()
    use_gpu = run["resources"]["use_gpu"] and torch.cuda.is_available()
    metrics = {
        f"{prefix}/train_loss": out.training_loss, f"{prefix}/steps": out.global_step,
        f"{prefix}/train_samples_per_second": out.metrics.get("train_samples_per_second", 0.0),
        f"{prefix}/backward_seconds": timer.backward, f"{prefix}/step_seconds": timer.busy,
        f"{prefix}/resumed_from_step": resumed_step(resume), f"{prefix}/first_step_unix": timer.first_step_at or 0.0,
        "busy_seconds": timer.busy, "device": torch.cuda.get_device_name(0) if use_gpu else "CPU",
    }
    metrics.update(loss_summary(trainer.state.log_history, prefix))
    if summarize is not None:
        metrics.update(summarize(trainer.state.log_history))
    rank = ray.train.get_context().get_world_rank()
    if grades is not None:
        metrics.update({f"{prefix}/{k}": v for k, v in grades.summary().items()})
        # every rank's freeze decisions, so anyone can check that the ranks agreed
        events = Path(run["stage_dir"]) / f"grades_events_rank{rank}.json"
        events.write_text(json.dumps(grades.events, indent=1))
        if rank == 0:
            (Path(run["stage_dir"]) / "grades_history.json").write_text(json.dumps(grades.history()))
            plot = Path(run["stage_dir"]) / "grades_convergence.png"
            grades.plot(str(plot))
            try:
                from mlflow.tracking import MlflowClient
                MlflowClient(tracking_uri=run["mlflow_uri"]).log_artifact(run["mlflow_run_id"], str(plot))
            except Exception:  # store unreachable: the plot stays in the stage directory
                pass
    if rank != 0:
        ray.train.report(metrics)
        return
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with tempfile.TemporaryDirectory() as tmp:
        getattr(model, "module", model).save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
