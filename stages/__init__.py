"""Pipeline stages: one file each, one small uniform interface.

A stage module defines:

* ``CONFIG_KEYS`` – the config fields its result depends on (with its inputs' keys: the stage-cache key);
* ``check(cfg)``  – static validation before any work in the pipeline starts (raise ``UserError``);
* ``run(ctx) -> StageOutput`` – do the work, reading earlier stages' outputs from ``ctx.inputs``;

and optionally ``SOURCE_KEYS`` (config fields naming local directories, keyed by their content) and ``DATA_FILES``
(project files it loads by path). The stage-cache key also covers the project code it runs and the packages under
it (``harness/codeprint.py``).

The harness (``harness/pipeline.py``) does the rest: timing, accelerator accounting, MLflow child runs,
``result.json``. Training stages hand their loop to Ray Train through ``runtime.raytrain``.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from runtime.config import STAGE_NAMES, TRAINING_STAGES

if TYPE_CHECKING:
    from evals.item_cache import Location
    from runtime.config import PipelineConfig
    from runtime.cost import Meter
    from runtime.tracking import Tracker
    from stages.eval import Early


class _Registry(Mapping[str, ModuleType]):
    """Stage name -> its module (``stages/<name>.py``), imported on first use."""

    def __getitem__(self, name: str) -> ModuleType:
        if name not in STAGE_NAMES:
            raise KeyError(f"unknown stage '{name}' (known: {', '.join(STAGE_NAMES)})")
        return importlib.import_module(f"stages.{name}")

    def __iter__(self) -> Iterator[str]:
        return iter(STAGE_NAMES)

    def __len__(self) -> int:
        return len(STAGE_NAMES)


STAGES = _Registry()
TRAINING = TRAINING_STAGES  # the stages whose config section is a TrainStageConfig (align, sft, dpo, grpo)


@dataclass(frozen=True)
class StepCost:
    """What one optimizer step of a training stage costs per sample (a DPO pair, a GRPO completion), in forward
    passes of the model over the sample: a backward pass is two, so a trained sample is 3. ``tokens`` says what a
    pass reads: the whole sample (prompt and answer), or the prompt and ``new_tokens`` generated tokens (each of
    which is one more small forward while generating)."""
    passes: float
    tokens: Literal["sample", "prompt"] = "sample"
    new_tokens: int = 0


@dataclass
class StageOutput:
    """What a stage hands back: metrics, named outputs (paths, fingerprints) for later stages, and where its work
    ran (``ran_on``: node id, device, hardware of the Ray worker; empty for work done in the driver)."""
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    ran_on: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    name: str
    cfg: PipelineConfig
    run_dir: Path
    stage_dir: Path
    inputs: dict[str, StageOutput]
    tracker: Tracker
    mlflow_run_id: str
    meter: Meter
    ray_storage: Path | str  # Ray Train storage_path (a bucket's URI too) and run name: stable per stage key
    ray_name: str
    say: Callable[[str], None] = print  # the run's console: warnings a user should see
    item_cache: Location | None = None  # where the eval keeps its answers (evals/item_cache.py); None: nowhere
    early: dict[str, Early] = field(default_factory=dict)  # the eval's scorings started while training ran, by label
    score_checkpoints: bool = False  # a training stage: score each checkpoint it saves (eval.checkpoints=all)

    def latest(self, key: str) -> Any:
        """The most recent earlier stage's output ``key`` (e.g. the newest ``model_dir``)."""
        for out in reversed(list(self.inputs.values())):
            if key in out.outputs:
                return out.outputs[key]
        raise KeyError(f"stage '{self.name}' needs '{key}' from an earlier stage, but none produced it")
