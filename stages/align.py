"""Stage `align`: train the connector only, vision and language frozen ("locked image tuning", MODA/LLaVA
stage 1), with the SFT objective on the task data. Typically follows a composed model (`model.source: compose`).
"""
from __future__ import annotations

from stages import StageContext, StageOutput, StepCost
from stages.sft import train_loop
from stages.support import launch

CONFIG_KEYS = ("seed", "align", "resources")


def step_cost(section) -> StepCost:
    """SFT's objective: counted as a trained sample (3), an upper bound, since the frozen towers' weights get no
    gradient (their activations' gradients are still computed, back to the connector)."""
    return StepCost(passes=3)


def check(cfg) -> None:
    launch.check_grades(cfg, "align")


def run(ctx: StageContext) -> StageOutput:
    stage_cfg = ctx.cfg.align.model_copy(deep=True)
    stage_cfg.components.vision.freeze = True
    stage_cfg.components.language.freeze = True
    stage_cfg.components.connector.freeze = False
    return launch.run_stage(ctx, train_loop, stage_cfg)
