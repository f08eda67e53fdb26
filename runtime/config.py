"""The validated configuration: one pydantic model per stage, grouped fields, `key=value` overrides.

A config file is YAML (parsed safely); overrides are a torchtune-style dotlist (`sft.max_steps=50`).
Unknown keys, wrong types and missing files fail here, before any work, with the offending key named.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evals.registry import PROTOCOLS, REASONING_TAGS, TASKS
from runtime.architectures import ARCHITECTURES
from runtime.cost import DEFAULT_PRICES
from runtime.errors import ConfigError
from runtime.secrets import is_secret_key, redact, redact_text

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# The layout of config.yaml / result.json this vlmlab writes. 1: before schema_version existed (read as is: 2 only
# added fields). 2: stage records carry `code`, `outputs`, `ran_on`. 3: tasks under `data.tasks` (registry names).
SCHEMA_VERSION = 3
DEFAULT_PRESET = "tiny"

PROVIDER = {"tasks": "data", "model_dir": "model"}  # which stage hands on each of StageSection.needs
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # run and pipeline names become directory names
LR_SCHEDULERS = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                        "inverse_sqrt"]
TASK_COLUMNS = Literal["image", "question", "answers", "answer", "question_type", "subset"]
PREFERENCE_COLUMNS = Literal["question", "chosen", "rejected", "image"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no .inf / .nan learning rates or betas


class StageSection(Section):
    """A stage's settings. A PipelineConfig field of this type declares the stage (its module: stages/<field>.py);
    ``needs``/``gives`` are what it reads from earlier stages and hands on (StageContext.latest)."""
    needs: ClassVar[tuple[str, ...]] = ("tasks", "model_dir")
    gives: ClassVar[tuple[str, ...]] = ()


def looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~"))


def local_path(value: str, what: str) -> Path:
    """``value`` as the OS will take it: ``~``/``~user`` expanded, each name and the whole within the OS's limits
    (255 and 4096 bytes); ValueError, one line with the fix, otherwise."""
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~user for a user this machine does not know
        raise ValueError(f"{what} {value}: no user '{value.split('/')[0][1:]}' here; give the path in full") from None
    if len(os.fsencode(str(path))) >= 4096 or any(len(os.fsencode(part)) > 255 for part in path.parts):
        raise ValueError(f"{what} {value[:40]}...: longer than the OS allows (255 bytes a name, 4096 in all); use a "
                         "shorter path")
    return path


def output_dir_problem(value: str) -> str | None:
    """Why a local output directory cannot hold runs (a path too long, an unknown ~user, a file where a directory
    must be), or None; a bucket URI is the object store's to judge."""
    if "://" in value and not value.startswith("file://"):
        return None
    try:
        path = local_path(value.removeprefix("file://"), "output directory")
    except ValueError as exc:
        return str(exc)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            return f"output directory {value}: {part} is a file, not a directory; give a directory"
    return None


def _existing(what: str):
    """A validator: a value written as a path (/, ./, ../, ~) must exist; hub ids and names pass."""
    def check(v: str) -> str:
        if looks_like_path(v):
            try:
                found = local_path(v, what).exists()
            except OSError as exc:
                raise ValueError(f"{what} {v}: cannot be read ({exc.strerror})") from None
            if not found:
                raise ValueError(f"{what} not found: {v}")
        return v
    return AfterValidator(check)


FORMATS = Literal["auto", "parquet", "hf_disk", "vqa_official", "chartqa_json", "cauldron", "hub"]


class SourceConfig(Section):
    """A task's training split from another dataset than its test split (e.g. a the_cauldron subset)."""
    source: Annotated[str, _existing("data directory")]
    format: FORMATS = "auto"
    hub_config: str | None = Field(None, description="the hub dataset's config (the_cauldron: the subset name)")
    revision: str | None = Field(None, description="hub dataset revision (a commit) to pin")
    split: str = "train"


class TaskDataConfig(Section):
    """Where one task's data comes from: the synthetic generator, a local directory, or a hub dataset id."""
    source: Annotated[str, _existing("data directory")] = "synthetic"
    format: FORMATS = "auto"
    hub_config: str | None = Field(None, description="the hub dataset's config (e.g. DocVQA)")
    revision: str | None = Field(None, description="hub dataset revision (a commit) to pin")
    train_from: SourceConfig | None = Field(None, description="the train split from another source")
    train_split: str = "train"
    test_split: str = "test"
    columns: dict[TASK_COLUMNS, str] = Field(default_factory=dict, description="canonical name -> source column")
    train_size: int | None = Field(None, ge=1)
    test_size: int | None = Field(None, ge=1)
    allow_overlap: bool = Field(False, description="let test items that also occur in the train split through")


class DataConfig(StageSection):
    needs: ClassVar[tuple[str, ...]] = ()
    gives: ClassVar[tuple[str, ...]] = ("tasks",)
    image_size: int = Field(64, ge=16, le=2048)
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="seed of the synthetic tasks' items (null: the "
                             "run's seed); fix it to vary the training seed over the same items (harness compare)")
    tasks: dict[str, TaskDataConfig | None] = Field(
        default_factory=lambda: {name: TaskDataConfig(train_size=8000, test_size=300) for name in ("vqa", "chartqa")},
        description="benchmark task (evals/registry.py) -> its data; null drops a task")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: dict) -> dict:
        for name in v:
            if name not in TASKS:
                close = difflib.get_close_matches(name, TASKS, n=1)
                raise ValueError(f"unknown task '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                                 + f"; known tasks: {', '.join(TASKS)}")
        v = {name: spec for name, spec in v.items() if spec is not None}
        if not v:
            raise ValueError(f"no task left; give at least one of {', '.join(TASKS)}")
        return v


class TinyModelConfig(Section):
    """Sizes of the tiny Idefics3 model built offline (`model.source: tiny`)."""
    vocab_size: int = Field(400, ge=64)
    patch_size: int = Field(8, ge=1)
    scale_factor: int = Field(2, ge=1)
    vision_hidden: int = Field(128, ge=8)
    vision_layers: int = Field(3, ge=1)
    vision_heads: int = Field(4, ge=1)
    text_hidden: int = Field(192, ge=8)
    text_intermediate: int = Field(768, ge=8)
    text_layers: int = Field(4, ge=1)
    text_heads: int = Field(4, ge=1)


class ComposeConfig(Section):
    """Build a VLM from backbones (`model.source: compose`): a vision encoder and a language model."""
    vision: Annotated[str, _existing("directory")] = Field(..., description="SigLIP/CLIP vision checkpoint: local "
                                                           "dir or hub id")
    language: Annotated[str, _existing("directory")] = Field(..., description="causal LM with a chat template: "
                                                             "local dir or hub id")
    connector: Literal["linear", "mlp", "pixel_shuffle"] = "mlp"
    vision_layers: list[int] = Field(default_factory=lambda: [-1], min_length=1,
                                     description="several layers: multi-level feature fusion (LLaVA)")
    scale_factor: int = Field(2, ge=1, description="pixel_shuffle only")


class ModelConfig(StageSection):
    """`source: tiny` builds the tiny model, `random` a published architecture with random weights
    (`model.architecture`), `compose` joins backbones (`model.compose`); anything else is a local checkpoint dir or a
    hub id."""
    needs: ClassVar[tuple[str, ...]] = ("tasks",)
    gives: ClassVar[tuple[str, ...]] = ("model_dir",)
    source: Annotated[str, _existing("model directory")] = "tiny"
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    architecture: Literal[tuple(ARCHITECTURES)] | None = Field(
        None, description="with source: random, the published architecture to build (runtime/architectures.py)")
    image_longest_edge: int | None = Field(
        None, ge=16, le=8192, description="with source: random, the processor's resize target (default: the "
        "architecture's, a 4x4 grid of tiles); each side is split into ceil(edge / tile) tiles plus a global view")
    compose: ComposeConfig | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _source_complete(self) -> ModelConfig:
        if self.source == "compose" and self.compose is None:
            raise ValueError("model.source is 'compose' but model.compose is not set")
        if self.source == "random" and self.architecture is None:
            raise ValueError(f"model.source is 'random' but model.architecture is not set (one of "
                             f"{', '.join(ARCHITECTURES)})")
        if self.source != "random" and (self.architecture is not None or self.image_longest_edge is not None):
            given = "model.architecture" if self.architecture is not None else "model.image_longest_edge"
            raise ValueError(f"{given} is for model.source: random (here: {self.source!r}); drop it or set "
                             "model.source=random")
        return self


class ResourcesConfig(Section):
    """Ray Train scaling: one CPU/GPU worker on a laptop or a T4, N GPU workers on a cluster."""
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(2, gt=0)
    gpus_per_worker: float = Field(1, gt=0)
    placement_timeout_s: float = Field(300, ge=0, description="how long a stage waits for a cluster (an autoscaling "
                                       "one may grow) to have room for its workers before it stops with an error")
    fit: Literal["auto", "off"] = Field(
        "auto", description="auto: before a training or eval stage, the largest per-device batch whose predicted peak "
        "memory fits the worker's device (the effective batch kept with gradient accumulation; gradient "
        "checkpointing only when needed), on GPU runs and wherever device_memory_gb is set; off: as configured")
    device_memory_gb: float | None = Field(
        None, gt=0, description="the worker device's memory where torch cannot read it (and on CPU, to plan as if "
        "for that device)")

    @field_validator("fit", mode="before")
    @classmethod
    def _yaml_switch(cls, value):
        """YAML reads `fit: off` (and `fit=off`) as false, `on` as true."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


class RayConfig(Section):
    """The local Ray instance the harness starts (not used under `ray job submit`, which attaches to a cluster)."""
    dashboard: bool = Field(False, description="also start Ray's dashboard on 127.0.0.1:8265 (nine more processes "
                                               "sharing the training cores)")


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class GradESSettings(Section):
    """GradES: freeze each weight matrix once its per-interval L1 change falls under tau (after alpha)."""
    enabled: bool = False
    vision_tau: float = Field(0.3, ge=0)
    language_tau: float = Field(6.0, ge=0)
    alpha: float = Field(0.28, ge=0, le=1, description="grace period, as a fraction of max_steps")
    compute_interval: int = Field(20, ge=1)
    max_frozen_ratio: float = Field(1.0, gt=0, le=1, description="stop training at this frozen fraction")
    patterns: dict[Literal["vision", "language"], list[str]] | None = Field(
        None, description="regexes over parameter names per group (default: Idefics3, LLaVA, Qwen2-VL names)")

    @field_validator("patterns")
    @classmethod
    def _valid_regexes(cls, v):
        for group, pats in (v or {}).items():
            for pat in pats:
                try:
                    re.compile(pat)
                except re.error as exc:
                    raise ValueError(f"{group} pattern {pat!r} is not a valid regex: {exc}") from None
        return v


class ComponentSettings(Section):
    lr: float | None = Field(None, gt=0, description="learning rate for this component (default: the stage's)")
    freeze: bool = False


class ComponentsConfig(Section):
    """Per-component learning rates and freezing (NanoVLM-Lab's lr_vision / lr_language / lr_mp)."""
    vision: ComponentSettings = Field(default_factory=ComponentSettings)
    language: ComponentSettings = Field(default_factory=ComponentSettings)
    connector: ComponentSettings = Field(default_factory=ComponentSettings)


class RuntimeEnvConfig(Section):
    """Ray runtime_env of a stage's training workers: `env_vars` are set in the workers' environment before they
    start (e.g. `MALLOC_ARENA_MAX`, which glibc reads only then). No `image_uri`: Ray's podman path cannot run a
    stage here (docs/image_uri.md); make the vlmlab image the Ray nodes' image instead."""
    env_vars: dict[str, str] = Field(default_factory=dict)

    @field_validator("env_vars", mode="before")
    @classmethod
    def _scalars_as_strings(cls, value):
        """`env_vars.OMP_NUM_THREADS=2` arrives from YAML as a number: environment values are strings."""
        if not isinstance(value, dict):
            return value
        as_text = {bool: lambda v: str(v).lower(), int: str, float: str}
        return {k: as_text[type(v)](v) if type(v) in as_text else v for k, v in value.items()}


class TrainStageConfig(StageSection):
    """Fields every training stage (sft, dpo, grpo, align) shares."""
    gives: ClassVar[tuple[str, ...]] = ("model_dir",)
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1, description="per worker")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    lr_scheduler: LR_SCHEDULERS = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less "
                                         "memory, ~30 % more time (resources.fit turns it on when only it fits)")
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(250, ge=1)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    grades: GradESSettings = Field(default_factory=GradESSettings)
    components: ComponentsConfig = Field(default_factory=ComponentsConfig)
    runtime_env: RuntimeEnvConfig = Field(default_factory=RuntimeEnvConfig)

    @field_validator("save_steps")
    @classmethod
    def _checkpoint_before_the_end(cls, v: int, info) -> int:
        last = info.data.get("max_steps")
        if last is not None and v > last:
            raise ValueError(f"more than max_steps ({last}): no checkpoint to resume from before the end; set it to "
                             f"{last} or less")
        return v


class SFTConfig(TrainStageConfig):
    pass


class AlignConfig(TrainStageConfig):
    """Connector-only training ("locked image tuning"): vision and language are always frozen here."""
    max_steps: int = Field(300, ge=1)
    learning_rate: float = Field(1e-3, gt=0)


class PreferenceDataConfig(Section):
    """DPO pairs: built from the task data (`source: tasks`), or a preference dataset in the RLAIF-V layout
    (question / chosen / rejected / image; `columns` remaps) from a local directory or the hub."""
    source: Annotated[str, _existing("preference data directory")] = "tasks"
    format: Literal["auto", "parquet", "hf_disk", "hub"] = "auto"
    split: str = "train"
    columns: dict[PREFERENCE_COLUMNS, str] = Field(default_factory=dict, description="canonical name -> source column")
    size: int | None = Field(None, ge=1)
    rejected: Literal["same_type", "on_policy"] = Field(
        "same_type", description="same_type: another answer of the same question type; on_policy: the "
        "checkpoint's own wrong generation where it has one")
    chosen_style: Literal["short", "sentence"] = Field(
        "short", description="sentence: 'The answer is X.' (NanoVLM-Lab style; eval extracts X)")


class DPOConfig(TrainStageConfig):
    max_steps: int = Field(150, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    warmup_steps: int = Field(10, ge=0)
    save_steps: int = Field(50, ge=1)
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero"] = "sigmoid"
    sft_weight: float = Field(0.0, ge=0, description="add the chosen answers' SFT loss with this weight (RPO); "
                              "keeps DPO from drifting away from what SFT taught")
    preference: PreferenceDataConfig = Field(default_factory=PreferenceDataConfig)


class GRPOConfig(TrainStageConfig):
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1, description="completions per step per worker")
    learning_rate: float = Field(1e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(50, ge=1)
    num_generations: int = Field(4, ge=2)
    max_completion_length: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.0, ge=0, description="KL coefficient")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"
    rewards: list[str] = Field(default_factory=lambda: ["accuracy"],
                               description="built-in (accuracy, format), module:function or file.py:function")
    reward_weights: list[float] | None = None

    @model_validator(mode="after")
    def _shapes(self) -> GRPOConfig:
        if (self.batch_size * self.gradient_accumulation_steps) % self.num_generations:
            raise ValueError("batch_size x gradient_accumulation_steps must be a multiple of num_generations")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError("reward_weights needs one weight per entry of rewards")
        if not self.rewards:
            raise ValueError("rewards: name at least one reward function")
        return self


TagPair = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=2, max_length=2)]  # [start, end]


class EvalConfig(StageSection):
    protocol: Literal[PROTOCOLS] = Field("short", description="short: terse prompts for tiny models; lmms: "
                                         "lmms-eval's published prompts, generation and post-processing per task")
    batch_size: int = Field(64, ge=1)
    max_new_tokens: int = Field(8, ge=1, description="short protocol only (lmms: each task's own setting)")
    limit: int | None = Field(None, ge=1, description="score at most this many items per task")
    score_base: bool = True
    while_training: Literal["auto", "on", "off"] = Field(
        "auto", description="score the base model while the first training stage trains, and each stage's model while "
        "the next one trains, on workers beyond the training ranks (the same shards and batches: the same scores). "
        "auto: where the cluster has room for them, else after training as with off; on: stop with an error where "
        "it has none")
    checkpoints: Literal["final", "all"] = Field(
        "final", description="final: the base model and each stage's model; all: also every checkpoint a training "
        "stage saves before its end (each save_steps), scored through Ray Train's checkpoint validation on workers "
        "beyond the training ranks while it trains (where there is no room: once its workers are free, before the "
        "stage ends); needs while_training auto or on")
    bootstrap_samples: int = Field(1000, ge=100, description="resamples of the items for each metric's 95% interval")
    reasoning_tags: list[TagPair] = Field(
        default_factory=lambda: [list(pair) for pair in REASONING_TAGS], max_length=16,
        description="lmms protocol: [start, end] tag pairs whose blocks are cut before scoring, as lmms-eval's "
                    "command line does (--reasoning_tags, its default here); [] scores the whole generation")

    @field_validator("while_training", mode="before")
    @classmethod
    def _yaml_switch(cls, value):
        """YAML reads `while_training: on` (and `=off`) as a bool."""
        return {False: "off", True: "on"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _checkpoints_while_training(self):
        if self.checkpoints == "all" and self.while_training == "off":
            raise ValueError("checkpoints=all scores each checkpoint while its stage trains: set while_training to "
                             "auto (or on), or checkpoints to final")
        return self


class CostConfig(Section):
    price_per_hour: float | None = Field(None, ge=0, description="override the detected device's price")
    prices: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: dict(DEFAULT_PRICES), min_length=1,
        description="USD per device-hour by device model (runtime/cost.py PRICE_TABLE)")


class FailureConfig(Section):
    """Fault tolerance of training stages: Ray Train restarts the worker group from its last checkpoint."""
    max_failures: int = Field(0, ge=-1, description="-1: retry forever")


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = Field("vlmlab", min_length=1, max_length=200)

    def resolved_uri(self) -> str:
        """The tracking URI, with a relative SQLite path made absolute (Ray workers run elsewhere)."""
        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            uri = prefix + str(Path(uri[len(prefix):]).resolve())
        return uri


class PipelineConfig(Section):
    """The whole run: which pipelines exist, and each stage's settings."""
    schema_version: int = Field(SCHEMA_VERSION, ge=1, description="the config layout's version (written by vlmlab)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="numpy's range")
    output_dir: str = "runs"
    run_name: str | None = Field(None, max_length=100, pattern=NAME)

    @field_validator("output_dir")
    @classmethod
    def _usable_output_dir(cls, value: str) -> str:
        problem = output_dir_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("run_name")
    @classmethod
    def _not_a_secret(cls, name: str | None) -> str | None:
        # a run name becomes directory, lease and MLflow run names and tags: a token pasted here would be in all
        if name is not None and redact_text(name) != name:
            raise ValueError("looks like a secret (a token or key), and a run name is written in paths and MLflow "
                             "names; pick another name")
        return name

    pipelines: dict[str, list[str]] = Field(default_factory=lambda: {"sft": ["data", "model", "sft", "eval"]})
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    failure: FailureConfig = Field(default_factory=FailureConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _tasks_of_schema_2(cls, raw):
        """Configs written before schema 3 (a run's config.yaml) name tasks as `data.vqa` / `data.chartqa`."""
        version = raw.get("schema_version", SCHEMA_VERSION) if isinstance(raw, dict) else None
        # a version that is not a number is left to the field's own check (one line naming schema_version)
        if isinstance(version, int) and version < 3 and isinstance(raw.get("data"), dict):
            data = dict(raw["data"])
            old = {name: data.pop(name) for name in ("vqa", "chartqa") if name in data}
            if old and "tasks" not in data:
                raw = {**raw, "data": {**data, "tasks": old}}
        return raw

    @field_validator("pipelines")
    @classmethod
    def _known_stages(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, chain in v.items():
            if not chain:
                raise ValueError(f"pipeline '{name}' has no stages")
            if not re.fullmatch(NAME, name) or len(name) > 50:
                raise ValueError(f"pipeline name '{name}' must be letters, digits, '_', '.', '-' (50 at most)")
            given: set[str] = set()
            for i, stage in enumerate(chain):
                if stage not in STAGE_NAMES:
                    raise ValueError(f"pipeline '{name}': unknown stage '{stage}' (known: {', '.join(STAGE_NAMES)})")
                if stage in chain[:i]:
                    raise ValueError(f"pipeline '{name}': stage '{stage}' appears twice; list each stage once")
                section = cls.model_fields[stage].annotation
                for need in section.needs:
                    if need not in given:
                        raise ValueError(f"pipeline '{name}': stage '{stage}' needs {need} from an earlier "
                                         f"'{PROVIDER[need]}' stage; put '{PROVIDER[need]}' before it, e.g. "
                                         "[data, model, sft, eval]")
                given.update(section.gives)
        return v

    @model_validator(mode="after")
    def _protocol_per_task(self) -> PipelineConfig:
        for name in self.data.tasks:
            if self.eval.protocol not in TASKS[name].protocols():
                raise ValueError(f"eval.protocol: task '{name}' has no '{self.eval.protocol}' protocol (it has: "
                                 f"{', '.join(TASKS[name].protocols())}); choose one of those or drop the task")
        return self

    @field_validator("schema_version")
    @classmethod
    def _not_newer(cls, v: int) -> int:
        if v > SCHEMA_VERSION:
            raise ValueError(f"written by a newer vlmlab (schema {v}; this one reads up to {SCHEMA_VERSION}): "
                             "upgrade vlmlab")
        return v

    def stages_of(self, pipeline: str) -> list[str]:
        if pipeline not in self.pipelines:
            raise ConfigError(f"unknown pipeline '{pipeline}' (this config defines: {', '.join(self.pipelines)}); "
                              "run one of those, or declare it under pipelines:")
        return self.pipelines[pipeline]

    def config_hash(self) -> str:
        """sha256 of the config as written to config.yaml: secrets replaced by their placeholders."""
        return hashlib.sha256(json.dumps(redact(self.model_dump(mode="json")), sort_keys=True).encode()).hexdigest()


STAGE_NAMES = tuple(name for name, f in PipelineConfig.model_fields.items()
                    if isinstance(f.annotation, type) and issubclass(f.annotation, StageSection))
# a training stage is one whose section is a TrainStageConfig: listed once, here
TRAINING_STAGES = tuple(name for name in STAGE_NAMES
                        if issubclass(PipelineConfig.model_fields[name].annotation, TrainStageConfig))


def eval_overrides(model: str, config: str | None, tasks: str | None, protocol: str | None,
                   limit: int | None) -> tuple[str | None, list[str]]:
    """`harness eval`'s config and overrides: the run's config.yaml when ``model`` is a checkpoint a vlmlab run
    saved (``<run>/<stage>/model``, so data and eval settings match that run's) and no --config is given; a
    pipeline `eval: [data, model, eval]` scoring ``model``."""
    found = None
    try:
        path = local_path(model, "model")
        run_config = path.resolve().parent.parent / "config.yaml"
        if config is None and path.is_dir() and run_config.is_file():
            found = str(run_config)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"MODEL: {exc}") from None
    extra = [f"model.source={model}", "pipelines={eval: [data, model, eval]}", "run_name=null"]
    if protocol is not None:
        extra.append(f"eval.protocol={protocol}")
    if limit is not None:
        extra.append(f"eval.limit={limit}")
    if tasks is not None:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        unknown = [t for t in names if t not in TASKS]
        if unknown or not names:
            raise ConfigError(f"--tasks: unknown task '{(unknown or [tasks])[0]}' (known: {', '.join(TASKS)}); give a "
                              "comma-separated list of those")
        base = load_config(config or found)
        for name in TASKS:
            if name not in names:
                extra.append(f"data.tasks.{name}=null")
            elif name not in base.data.tasks:
                extra.append(f"data.tasks.{name}={{train_size: 8000, test_size: 300}}")
    return found, extra


def resolve_config_path(config: str | None) -> Path:
    """A preset name (`tiny`) or a file path; None means the default preset."""
    name = config or DEFAULT_PRESET
    path = Path(name)
    if not path.suffix and not path.is_file():  # a folder named like a preset does not hide it
        path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config file not found: {name}; give a YAML file or a preset ({presets})")
    return path


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last one silently)."""
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# Bounds on a YAML document (a config file, an override), checked on its node graph before anything is built from
# it: the deepest real config nests 6 levels, and a whole preset expands to ~600 nodes; an alias bomb (a few lines that
# expand to hundreds of MB) or thousands of nested brackets stop here with one line.
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 200_000
MAX_CONFIG_BYTES = 1 << 20


def _expanded(node, origin: str, depth: int = 0, memo: dict | None = None) -> int:
    """Nodes in ``node`` with every alias expanded (what constructing it would build); ConfigError past the bounds."""
    memo = {} if memo is None else memo
    if depth > MAX_YAML_DEPTH:
        raise ConfigError(f"{origin}: nested more than {MAX_YAML_DEPTH} levels deep; a vlmlab config nests a few")
    if id(node) in memo:
        return memo[id(node)]
    count = 1
    if isinstance(node, yaml.SequenceNode):
        count += sum(_expanded(child, origin, depth + 1, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        count += sum(_expanded(k, origin, depth + 1, memo) + _expanded(v, origin, depth + 1, memo)
                     for k, v in node.value)
    if count > MAX_YAML_NODES:
        raise ConfigError(f"{origin}: expands to more than {MAX_YAML_NODES:,} values (aliases included); a vlmlab "
                          "config has a few hundred")
    memo[id(node)] = count
    return count


def load_yaml(text: str, origin: str):
    """A YAML document, safely and strictly loaded (no duplicate keys) within MAX_YAML_DEPTH and MAX_YAML_NODES;
    ConfigError naming ``origin`` otherwise."""
    loader = None
    try:
        loader = _StrictLoader(text)  # a SafeLoader: no Python objects; its reader refuses control characters here
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded(node, origin)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{origin}: nested too deep to read; a vlmlab config nests a few levels") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{origin}: not valid YAML: {exc.problem or exc.context}{where}; fix it there") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML ({' '.join(str(exc).split())}); fix it there") from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=1 c=x` -> nested dict; values parsed as YAML scalars/lists (safe_load)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. sft.max_steps=50)")
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override; give each key once")
        node[parts[-1]] = load_yaml(raw, f"override '{item}'") if raw != "" else ""
    return tree


def config_values(tree: dict, dotted: str) -> dict[str, object]:
    """The values at ``dotted`` (``*`` matches every key of a mapping, e.g. ``data.tasks.*.source``) by full key."""
    head, _, rest = dotted.partition(".")
    keys = list(tree) if head == "*" and isinstance(tree, dict) else [head]
    found = {}
    for key in keys:
        value = tree.get(key) if isinstance(tree, dict) else None
        if not rest:
            found[key] = value
        elif isinstance(value, dict):
            found |= {f"{key}.{k}": v for k, v in config_values(value, rest).items()}
    return found


def merge(base: dict, update: dict) -> dict:
    """``update`` laid over ``base``, mappings merged key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _known_keys(loc: tuple) -> list[str]:
    """The keys the config model accepts where ``loc`` points (for 'did you mean')."""
    model = PipelineConfig
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:
            return []
        model = next((t for t in (field.annotation, *get_args(field.annotation))
                      if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return list(model.model_fields) if model else []


def format_errors(exc: ValidationError, origin: str,
                  fix: str = "fix it in the config file or with a key=value override") -> str:
    """Every problem on one line, each naming its key, and how to fix them."""
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        secret = any(is_secret_key(str(part)) for part in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), _known_keys(err["loc"][:-1]), n=1)
            if tuple(err["loc"][:-1]) == ("data",) and err["loc"][-1] in TASKS:
                close = [f"tasks.{err['loc'][-1]}"]  # schema 2's place for a task
            msg = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
        elif secret:
            msg += " (the value is not shown: the key holds a secret)"
        elif "input" in err and not isinstance(err["input"], dict):
            got = redact_text(repr(err["input"]))  # redacted before it is cut: a cut never leaves half a secret
            msg += f" (got {got if len(got) <= 60 else got[:57] + '...'})"
        # a model check names its own keys; after a secret-named key a ':' would read as its value to the redactor
        sep = ", " if secret else ": "
        problems.append(msg if key == "<root>" else f"{key}{sep}{msg}")
    return f"invalid config ({origin}): {'; '.join(problems)}; {fix}"


def load_config(config: str | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a preset or YAML file, apply `key=value` overrides and validate. Raises ConfigError."""
    path = resolve_config_path(config)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size / 2 ** 20:.1f} MiB, too large for a config (at most "
                          f"{MAX_CONFIG_BYTES // 2 ** 20} MiB); give the YAML file of a vlmlab config")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); save the "
                          "file as UTF-8") from None
    raw = load_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys (seed: 0, sft: {{...}}), "
                          f"not a {type(raw).__name__}")
    merged = merge(raw, parse_overrides(overrides or []))
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, f"{path}{' and overrides' if overrides else ''}")) from None
