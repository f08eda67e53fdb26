"""The one typed object a training stage hands its Ray Train workers (`train_loop_config={"settings": ...}`).

Everything a worker reads comes from here: the stage's own validated config section, the run's seed and
resources, where its inputs are and where its scratch goes. Pickled across the Ray boundary as is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from runtime.config import ResourcesConfig, TrainStageConfig


@dataclass(frozen=True)
class TrainSettings:
    stage: TrainStageConfig  # the stage's section (sft, dpo, grpo, align), validated
    prefix: str  # metric prefix: the stage's name
    seed: int
    resources: ResourcesConfig
    model_dir: str  # the checkpoint training starts from
    tasks: dict[str, dict[str, str]]  # task -> split -> canonical parquet file
    trust_remote_code: bool
    stage_dir: str  # absolute: every node sees the run directory
    mlflow_uri: str
    mlflow_run_id: str
    inputs: dict[str, str] = field(default_factory=dict)  # stage-specific files, e.g. DPO's pairs
    score_checkpoints: bool = False  # eval.checkpoints=all: each save before the end goes to Ray's validation

    @property
    def scratch_root(self) -> Path:
        """Removed by the driver when the stage ends: Ray's storage holds the checkpoints that matter."""
        return Path(self.stage_dir) / "trainer"

    def scratch(self, rank: int) -> Path:
        """This rank's own scratch directory (HF output_dir, resumed checkpoint): no path is shared by ranks."""
        return self.scratch_root / f"rank{rank}"

    @property
    def mlflow_outbox(self) -> str:
        """Where rank 0 queues step metrics while the tracking store is unreachable (`harness sync` replays it)."""
        return str(Path(self.stage_dir) / "mlflow_outbox_worker.jsonl")
