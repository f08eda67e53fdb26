"""Typed readers for the files vlmlab writes and later reads back: a run's `result.json`, a stage's `stage.json`, a
run's `config.yaml`. Every command reads them through here, so that a truncated, empty, wrong-typed or wrong-kind file
(a directory, binary, a list, a string where a number goes, a newer schema) is one UserError naming the file and the
field, and never a traceback: files in a run directory are user input once they have sat on a disk.

The models name what the commands read; anything else in the file is kept as written (``extra="allow"``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, TypeAdapter, ValidationError, field_validator

from runtime.config import SCHEMA_VERSION, load_yaml
from runtime.cost import PHASES
from runtime.errors import ConfigError, UserError

MAX_BYTES = 64 * 2 ** 20  # the largest record read back (a five-task run's result.json: ~60 KB)


WORK_PHASES = tuple(p for p in PHASES if p != "idle")  # what a worker reports (idle is what is left)


class Record(BaseModel):
    """A file vlmlab wrote: the fields a reader needs are typed, the rest kept as written."""
    model_config = ConfigDict(extra="allow")


class StageCode(Record):
    """The project code a stage ran (schema 2 on): file -> digest, and the git commit."""
    files: dict[str, str] = Field(default_factory=dict)
    git_sha: str | None = None


class StageRecord(Record):
    """A stage as `harness run` recorded it (stage.json, and each entry of result.json's ``stages``)."""
    name: str
    metrics: dict[str, float] = Field(default_factory=dict)
    wall_seconds: float = 0.0
    accelerator_hours: float = 0.0
    cost_usd: float = 0.0
    device: str = "CPU"
    devices: float = 0.0
    cost: dict[str, float] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)
    held: dict[str, float] | None = None
    reused_from: str | None = None
    code: StageCode | None = None


class TrackingRecord(Record):
    uri: str | None = None
    experiment: str | None = None


class ConfigRecord(Record):
    """The resolved config a run recorded: what commands read from it without rerunning it (the whole of it is
    validated by PipelineConfig when it is rerun)."""
    tracking: TrackingRecord = Field(default_factory=TrackingRecord)


class ResultRecord(Record):
    """A finished run's result.json."""
    schema_version: int = 1
    run_id: str
    pipeline: str
    config: ConfigRecord
    metrics: dict[str, float]
    manifest: dict[str, Any]
    stages: list[StageRecord] = Field(default_factory=list)
    cost_usd: float = 0.0
    accelerator_hours: float = 0.0
    wall_seconds: float = 0.0
    reused_stages: list[str] = Field(default_factory=list)
    mlflow_run_id: str | None = None


class MatrixHistory(Record):
    """One weight matrix in a stage's grades_history.json (stages/support/grades.py ``history()``)."""
    group: str
    changes: list[tuple[int, float]] = Field(default_factory=list)  # (step, relative change) per GradES check
    frozen_at: int | None = None


GradesHistory = RootModel[dict[str, MatrixHistory]]


class ScoredShard(Record):
    """One shard of a checkpoint's scoring: where and when it ran (Unix times), its seconds per phase."""
    node_id: str
    device: str
    began: float
    ended: float
    phases: dict[Literal[WORK_PHASES], Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    items: int = 0
    generated: int = 0


class ScoredItem(Record):
    """One item a checkpoint's scoring answered (stages/eval.py score_shard's items)."""
    task: str
    doc_id: int
    question_type: str
    subset: str
    prediction: str
    score: float


class CheckpointScore(Record):
    """A checkpoint a training stage saved and the eval scored while the stage trained (eval.checkpoints=all;
    ``<stage>/checkpoint_scores/step-<N>.json``, written by stages/eval.py ``score_checkpoint``)."""
    stage: str
    step: int = Field(ge=1)
    settings: dict[str, Any]  # what the scores depend on besides the weights (stages/eval.py checkpoint_settings)
    began: float
    ended: float
    metrics: dict[str, float]
    shards: list[ScoredShard] = Field(min_length=1)
    items: list[ScoredItem] = Field(min_length=1)

    @field_validator("metrics")
    @classmethod
    def _has_the_mean(cls, value: dict[str, float]) -> dict[str, float]:
        if "mean_accuracy" not in value:
            raise ValueError("no mean_accuracy")
        return value


class ScoredCheckpoint(Record):
    """One entry of a training stage's ``outputs.checkpoint_scores`` (stages/eval.py bill_scored_checkpoints): where
    its checkpoint's scores are; its timings are kept as written."""
    file: str


def _fix(hint: str) -> str:
    return f"; {hint}" if hint else ""


def _text(path: Path, what: str, hint: str) -> str:
    if path.is_dir():
        raise UserError(f"{path}: a directory, not a {what} file{_fix(hint)}")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise UserError(f"{path}: {size / 2 ** 20:.0f} MiB, too large for a {what} file (at most "
                            f"{MAX_BYTES // 2 ** 20} MiB){_fix(hint)}")
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc}){_fix(hint)}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}){_fix(hint)}") from None


def _validated(model: type[BaseModel], data: Any, path: Path, what: str, hint: str, newest: int | None) -> dict:
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a vlmlab {what} (the top level is a {type(data).__name__}, not an object)"
                        f"{_fix(hint)}")
    version = data.get("schema_version", 1)
    if newest and isinstance(version, int) and not isinstance(version, bool) and version > newest:
        raise UserError(f"{path}: written by a newer vlmlab (schema {version}; this one reads up to {newest}): "
                        "upgrade vlmlab to read it")
    try:
        return model.model_validate(data).model_dump()  # coerced, defaults filled in, other keys as written
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<top level>'}: {e['msg'].lower()}"
                             for e in exc.errors()[:3])
        raise UserError(f"{path}: not a vlmlab {what} ({problems}){_fix(hint)}") from None


def read_json(path: Path, model: type[BaseModel], what: str, hint: str, newest: int | None = None) -> dict:
    """The JSON file at ``path`` checked against ``model`` (a dict of its fields, the file's other keys kept), or a
    UserError naming the file, the field and ``hint`` (the fix). ``newest``: the highest schema_version this vlmlab
    reads."""
    text = _text(path, what, hint)
    try:
        data = json.loads(text)
    except ValueError as exc:  # also a number too deep or too large to parse
        raise UserError(f"{path}: not valid JSON ({exc}){_fix(hint)}") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deep to be a {what}{_fix(hint)}") from None
    return _validated(model, data, path, what, hint, newest)


def read_result(path: Path, hint: str = "give the result.json a `harness run` wrote") -> dict:
    return read_json(path, ResultRecord, "result", hint, newest=SCHEMA_VERSION)


def read_stage(path: Path, hint: str = "rerun the stage (delete its directory) or restore the file") -> dict:
    return read_json(path, StageRecord, "stage record", hint)


def read_grades_history(path: Path) -> dict:
    return read_json(path, GradesHistory, "GradES history", "rerun the stage with GradES on, or delete the file")


class CheckpointRow(Record):
    """One checkpoint scored while its stage trained, as the eval stage reports it (``outputs.checkpoints``)."""
    checkpoint: str
    stage: str
    step: int
    metrics: dict[str, float]


def checkpoint_rows(rows: Any, path: Path) -> list[dict]:
    """The eval stage's ``outputs.checkpoints`` of the run recorded in ``path``, checked (a UserError naming it)."""
    try:
        return [r.model_dump() for r in TypeAdapter(list[CheckpointRow]).validate_python(rows)]
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].lower()}" for e in exc.errors()[:3])
        raise UserError(f"{path}: the eval stage's outputs.checkpoints is not what vlmlab wrote ({where}); rerun the "
                        "eval (harness run ... --force)") from None


def scored_checkpoint(entry: Any, stage: str) -> dict:
    """An entry of training stage ``stage``'s ``outputs.checkpoint_scores``, checked (a UserError naming it)."""
    try:
        return ScoredCheckpoint.model_validate(entry).model_dump()
    except ValidationError:
        raise UserError(f"{stage}'s record lists a checkpoint score that is not one ({str(entry)[:80]}); --force "
                        f"reruns {stage}") from None


def read_checkpoint_score(path: Path) -> dict:
    return read_json(path, CheckpointScore, "checkpoint score", "delete it: that checkpoint is left out")


def read_mapping_yaml(path: Path, what: str, hint: str) -> dict:
    """A YAML file whose top level must be a mapping (a run's config.yaml), loaded as configs are (load_yaml: safe,
    strict, bounded in depth and alias expansion)."""
    text = _text(path, what, hint)
    try:
        data = load_yaml(text, str(path)) if text.strip() else {}
    except ConfigError as exc:
        raise UserError(f"{exc}{_fix(hint)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a {what} (the top level is a {type(data).__name__}, not a mapping){_fix(hint)}")
    return data
