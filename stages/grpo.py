"""Stage `grpo`: group relative policy optimisation with TRL's GRPOTrainer, as a Ray Train job.

Rewards: the built-in `accuracy` (VQA exact match after normalisation, ChartQA relaxed match) and `format`
(`<think>…</think><answer>…</answer>`), or user functions named `module:function` / `file.py:function`,
all resolved before any work starts.
"""
from __future__ import annotations

from evals import rewards
from runtime.errors import ConfigError
from stages import StageContext, StageOutput, StepCost
from stages.support import launch, training

CONFIG_KEYS = ("seed", "grpo", "resources")


def step_cost(section) -> StepCost:
    """A completion: generated (about one forward over prompt and completion), then trained (3), and scored by the
    reference model when the KL term is on (1); each of its new tokens is one more small forward."""
    return StepCost(passes=4 + (1 if section.beta > 0 else 0), tokens="prompt",
                    new_tokens=section.max_completion_length)


def check(cfg) -> None:
    launch.check_grades(cfg, "grpo")
    for i, spec in enumerate(cfg.grpo.rewards):
        try:
            rewards.check(spec)  # without importing: no user code runs here
        except ValueError as exc:
            raise ConfigError(f"grpo.rewards[{i}]: {exc}") from None


def reward_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def summarize(history: list[dict], main_reward: str) -> dict[str, float]:
    """Mean main reward over the first and the last 10% of GRPO steps."""
    key = f"rewards/{main_reward}/mean"
    logs = [h[key] for h in history if key in h]
    if not logs:
        return {}
    start, end = training.start_end(logs)
    return {"grpo/reward_start": start, "grpo/reward_end": end}


def plan_rows(rows: list[dict]) -> list[dict]:
    """Canonical rows as this stage's trainer reads prompts (the memory plan's step)."""
    return [{"image": r["image"], "prompt": training.user_turn(r["question"]), "answer": r["answer"],
             "answers": r.get("answers", [r["answer"]]), "task": r.get("task", "vqa"),
             "question_type": r.get("question_type", "all")} for r in rows]


def make_trainer(settings, model, processor, data, output_dir, funcs=None):
    """The stage's TRL trainer: what the Ray workers train with, and what the memory plan traces a step of (with
    the built-in accuracy reward: what a reward computes does not change the memory, and the plan runs no user
    code)."""
    from trl import GRPOConfig, GRPOTrainer

    stage = settings.stage
    funcs = funcs or [rewards.BUILTIN["accuracy"]]
    processor.tokenizer.padding_side = "left"
    weights = stage.reward_weights if stage.reward_weights and len(stage.reward_weights) == len(funcs) else None
    args = GRPOConfig(
        **training.common_args(settings, output_dir), num_generations=stage.num_generations,
        max_completion_length=stage.max_completion_length, temperature=stage.temperature, beta=stage.beta,
        loss_type=stage.loss_type, reward_weights=weights, remove_unused_columns=False, log_completions=False)
    return GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=data, processing_class=processor,
                       peft_config=training.peft_config(stage.lora))


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    settings = config["settings"]
    stage = settings.stage
    scratch, model, processor, _ = training.start_worker(settings)
    data = training.load_tasks(settings.tasks, "train", settings.seed, with_task=True)
    data = data.map(lambda r: {"prompt": training.user_turn(r["question"])}, remove_columns=["question"])
    funcs = [rewards.resolve(spec) for spec in stage.rewards]
    trainer = make_trainer(settings, model, processor, data, scratch, funcs)
    main = reward_name(funcs[0])
    training.train_and_save(trainer, processor, settings, scratch, summarize=lambda h: summarize(h, main))


def run(ctx: StageContext) -> StageOutput:
    return launch.run_stage(ctx, train_loop, ctx.cfg.grpo)
