"""Stage `align`: train the connector only, vision and language frozen ("locked image tuning", MODA/LLaVA
stage 1), with the SFT objective on the task data. Typically follows a composed model (`model.source: compose`).
"""
from __future__ import annotations

from stages import StageContext, StageOutput, StepCost
from stages.sft import make_trainer, plan_rows, train_loop

__all__ = ["CONFIG_KEYS", "check", "make_trainer", "plan_rows", "run", "section", "step_cost"]  # SFT's trainer
from stages.support import launch

CONFIG_KEYS = ("seed", "align", "resources")


def step_cost(section) -> StepCost:
    """SFT's objective: counted as a trained sample (3), an upper bound, since the frozen towers' weights get no
    gradient (their activations' gradients are still computed, back to the connector)."""
    return StepCost(passes=3)


def check(cfg) -> None:
    launch.check_grades(cfg, "align")


def section(cfg):
    """The align section as it trains: vision and language frozen, the connector trained, whatever is configured."""
    stage_cfg = cfg.align.model_copy(deep=True)
    stage_cfg.components.vision.freeze = True
    stage_cfg.components.language.freeze = True
    stage_cfg.components.connector.freeze = False
    return stage_cfg


def run(ctx: StageContext) -> StageOutput:
    return launch.run_stage(ctx, train_loop, section(ctx.cfg))
