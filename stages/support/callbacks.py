"""Trainer callbacks of the training stages: step timing (busy time) and MLflow step metrics.

Kept apart from `training.py` so that the driver, which imports the stage modules, does not import the
transformers Trainer stack (~2 s); only Ray Train workers do.
"""
from __future__ import annotations

import time

from transformers import TrainerCallback

from runtime.output import write_progress
from runtime.tracking import BackgroundStepLogger


class StepTimer(TrainerCallback):
    """Seconds spent inside optimizer steps (forward, backward, update): the stage's busy time (``busy``), and in
    checkpoint saves between them (``saving``: from a step's end to the save's last callback, Ray's upload included
    when this callback comes after CheckpointReporter).

    ``instrument(trainer)`` also times the backward passes (``backward`` seconds); ``first_step_at`` is the
    wall-clock time (Unix seconds) the first step began, for time-to-first-step.
    """

    def __init__(self):
        self.busy = 0.0
        self.backward = 0.0
        self.saving = 0.0
        self.first_step_at = None
        self._t0 = None
        self._step_ended = None

    def instrument(self, trainer) -> None:
        inner = trainer.accelerator.backward

        def timed_backward(loss, **kwargs):
            start = time.perf_counter()
            try:
                return inner(loss, **kwargs)
            finally:
                self.backward += time.perf_counter() - start

        trainer.accelerator.backward = timed_backward

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self._step_ended = time.perf_counter()
            self.busy += self._step_ended - self._t0
            self._t0 = None

    def on_save(self, args, state, control, **kwargs):
        if self._step_ended is not None:
            self.saving += time.perf_counter() - self._step_ended
            self._step_ended = None


class MlflowStepLogger(TrainerCallback):
    """Streams the trainer's logs to the stage's MLflow run as step metrics (rank 0 only).

    Writes go through a background thread (`BackgroundStepLogger`): a step never waits on the store.
    ``close()`` (also on train end) waits for the queued writes.
    """

    def __init__(self, uri: str, run_id: str, prefix: str, outbox: str | None = None):

        self.prefix = prefix
        self.history: list[dict] = []
        self.writer = BackgroundStepLogger(uri, run_id, outbox)

    def log(self, metrics: dict, step: int) -> None:
        self.writer.log({f"{self.prefix}/{k}": v for k, v in metrics.items()}, step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.history.append({"step": state.global_step, **logs})
        self.log({k: v for k, v in logs.items() if isinstance(v, (int, float))}, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        self.writer.close()


class ProgressReporter(TrainerCallback):
    """Rank 0's progress for the driver's console (harness/console.py): step, total, the last loss (GRPO: reward) and
    the global batch, rewritten at most once a second to ``path``."""

    def __init__(self, path: str, label: str, every_s: float = 1.0):
        self.path, self.label, self.every_s = path, label, every_s
        self.metric: tuple[str, float] | None = None
        self._written = 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        first = self.metric is None
        logs = logs or {}
        for key in ("reward", "loss"):
            if isinstance(logs.get(key), (int, float)):
                self.metric = (key, float(logs[key]))
                break
        if first and self.metric is not None:  # the console need not wait a second for the first loss
            self.write(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if now - self._written >= self.every_s or state.global_step >= state.max_steps:
            self._written = now
            self.write(args, state)

    def write(self, args, state) -> None:

        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        write_progress(self.path, {"label": self.label, "step": state.global_step, "total": state.max_steps,
                                   "metric": self.metric, "global_batch": batch})


class CheckpointReporter(TrainerCallback):
    """Reports each checkpoint the trainer saves to Ray Train (with the metrics logged so far), as Ray's
    RayTrainReportCallback does; with ``score`` (eval.checkpoints=all) each one before the last step also asks for
    Ray Train's checkpoint validation, which scores it (stages/eval.py ``score_checkpoint``) while training goes on.
    Ray's own callback reports without validation; its layout is kept (``<ray checkpoint>/checkpoint/``: the HF
    checkpoint), so resuming reads either. The last step's save is the stage's final model, scored as such."""

    def __init__(self, score: bool):
        self.score = score

    def on_save(self, args, state, control, **kwargs):
        import shutil
        import tempfile
        from pathlib import Path

        import ray.train
        from ray.train import Checkpoint
        from ray.train.v2.api.validation_config import ValidationTaskConfig
        from transformers.trainer_utils import get_last_checkpoint

        metrics = {}
        for log in state.log_history:
            metrics.update(log)
        last = state.global_step >= state.max_steps or control.should_training_stop  # GradES may stop early
        validation = ValidationTaskConfig(fn_kwargs={"step": state.global_step}) if self.score and not last else False
        with tempfile.TemporaryDirectory() as tmp:
            source = get_last_checkpoint(args.output_dir)
            checkpoint = None
            if source is not None:
                shutil.copytree(source, Path(tmp, "checkpoint"))
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(metrics=metrics, checkpoint=checkpoint, validation=validation if checkpoint else False)
