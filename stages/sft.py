"""Stage `sft`: supervised fine-tuning with TRL's SFTTrainer, as a Ray Train job.

Prompt-completion form (loss on the answer only): the user turn holds the image and question, the assistant
turn the short answer.
"""
from __future__ import annotations

from stages import StageContext, StageOutput, StepCost
from stages.support import launch, training

CONFIG_KEYS = ("seed", "sft", "resources")


def step_cost(section) -> StepCost:
    """A trained sample: one forward and its backward (two forwards' work) over prompt and answer."""
    return StepCost(passes=3)


def check(cfg) -> None:
    launch.check_grades(cfg, "sft")


def to_prompt_completion(row: dict) -> dict:
    return {"prompt": training.user_turn(row["question"]), "completion": training.assistant_turn(row["answer"])}


def plan_rows(rows: list[dict]) -> list[dict]:
    """Canonical rows (image, question, answer) as this stage's trainer reads them (the memory plan's step)."""
    return [{"image": r["image"], **to_prompt_completion(r)} for r in rows]


def make_trainer(settings, model, processor, data, output_dir):
    """The stage's TRL trainer: what the Ray workers train with, and what the memory plan traces a step of."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**training.common_args(settings, output_dir), max_length=None, completion_only_loss=True)
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=processor,
                      peft_config=training.peft_config(settings.stage.lora))


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker (also for `align`, whose settings freeze all but the connector)."""
    settings = config["settings"]
    scratch, model, processor, trainable = training.start_worker(settings)
    data = training.load_tasks(settings.tasks, "train", settings.seed)
    data = data.map(to_prompt_completion, remove_columns=["question", "answers", "answer", "question_type"])
    trainer = make_trainer(settings, model, processor, data, scratch)
    prefix = settings.prefix
    counts = {f"{prefix}/trainable_params": float(sum(trainable.values())),
              **{f"{prefix}/trainable_params_{k}": float(v) for k, v in trainable.items()}}
    training.train_and_save(trainer, processor, settings, scratch, summarize=lambda _history: counts)


def run(ctx: StageContext) -> StageOutput:
    return launch.run_stage(ctx, train_loop, ctx.cfg.sft)
