"""`harness estimate`: a pipeline's wall time and cost per device, predicted from a short calibration run here.

**Calibration (measured).** The pipeline runs for real on this machine, in a temporary output directory with its
own SQLite MLflow store (the user's stage cache and run store are not touched), shortened: every training stage
runs ``--steps`` steps (default 40, harness/commands/estimate.py; a checkpoint halfway; its own step logging, but
at least 4 logs), each task's training split is capped at ``DATA_CAP`` rows, eval scores one batch per task and
checkpoint, DPO generates one batch of on-policy answers. Per stage it measures, from timestamps the harness
already records:

* training (align, sft, dpo, grpo): ``start`` (stage start to the first step: Ray Train start, model and data
  load, on-policy generation for DPO), the steady ``step`` wall time (slope of the step metrics' MLflow timestamps
  between logs with no checkpoint in between), of which ``busy`` is inside optimizer steps (the StepTimer's busy
  time) and the rest host work (batch collation, logging), the extra time of the first steps (``warm``), one
  intermediate checkpoint (``save``: the excess of the interval holding one), and ``tail`` (last step to stage
  end: final checkpoint, model report, Ray Train teardown);
* eval: generation seconds per item (the stage's busy time) and the rest of the stage (fixed: lm-eval set-up,
  model loads, the question-only prior, bootstrap intervals);
* data: seconds per row; model: as measured; outside the stages: interpreter start and imports, MLflow set-up,
  manifest, Ray shutdown.

**Extrapolation.** A stage of M steps with checkpoints every S steps takes ``start + warm + M x step +
(M-1)//S x save + tail``; eval and DPO generation scale with their item counts (items per checkpoint x
checkpoints), data with rows. On this machine's own device that is the prediction.

**Other devices (assumed).** Host work and fixed overheads stay as measured here; device work is modelled:

* a training step: ``floor + FLOPs / (peak x MFU)``. A forward pass costs 2 x (language+connector params x tokens
  + vision params x patches) + attention (4 x layers x sequence^2 x width); a trained sample 3 forwards, a DPO pair
  8 (chosen and rejected, each with the reference's forward), a GRPO completion 4 (generation + update), a
  generated answer 1. Tokens per sample come from the model's processor on training rows. ``floor`` is the
  per-step cost that does not shrink with FLOPs (kernel launches, framework): ``STEP_FLOOR_S +
  STEP_FLOOR_PER_TENSOR_S x parameter tensors``; generation adds one forward floor (``FORWARD_FLOOR_FRACTION`` of
  a step's) per new token per batch;
* the constants are fitted to this project's H200 measurements (results/gpu/): the default preset's SFT step
  through TRL (41.1 ms at 92 parameter tensors, compute-free), and a SmolVLM-256M-sized model (470 tensors) at
  batch 16/32/64 (130/174/249 ms: 90 ms + 2.45 ms per sample of 818 GFLOP, i.e. MFU 0.34 on the work that grows
  with FLOPs; the plain MFU of those runs, FLOPs / wall / peak, is 0.10-0.21). The model gives 129/168/246 ms
  for them (-1 to -4 %). MFU and floor are assumed the same on every GPU (only an H200 was measured);
* each process that starts CUDA pays ``CUDA_START_S`` (a training stage's workers; each eval or generation task).

FLOP rates of this machine: its matmul peak is measured (``peak_flops``), its achieved rate in the calibration is
reported, not assumed.
"""
from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from rich.text import Text

from harness.console import Display, duration
from harness.inputs import check_inputs
from harness.pipeline import run_pipeline
from runtime import raytrain
from runtime.config import PipelineConfig, format_errors, merge, parse_overrides
from runtime.cost import device_model
from runtime.errors import ConfigError, UserError
from runtime.tracking import Tracker
from stages import STAGES, TRAINING
from stages.data import SYNTHETIC_SIZES
from stages.support import fit
from stages.support.training import assistant_turn, component_of, user_turn

DATA_CAP = 2048  # training rows per task in the calibration


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float | None  # dense tensor-core peak at `precision` (None: measured here)
    precision: str
    memory_gib: float | None
    price_key: str  # the cost.prices key
    source: str


# Dense (no 2:4 sparsity) tensor-core peaks at the precision the harness trains in on that card.
DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("T4", 65.0, "fp16", 16, "T4", "NVIDIA T4 datasheet: 65 TFLOPS mixed precision (FP16/FP32); no bf16"),
    Device("L4", 121.0, "bf16", 24, "L4", "NVIDIA L4 datasheet: 242 TFLOPS bf16 with sparsity, 121 dense"),
    Device("A10G", 70.0, "bf16", 24, "A10G", "AWS G5's A10G: 70 TFLOPS bf16 tensor (Baseten, 'NVIDIA A10 vs A10G'; "
           "the A10 has 125)"),
    Device("A100", 312.0, "bf16", 80, "A100-80GB", "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense (624 sparse); "
           "priced as the 80 GB SXM4"),
    Device("H100", 756.0, "bf16", 80, "H100", "NVIDIA H100 datasheet, PCIe (the priced card): 1,513 TFLOPS bf16 "
           "sparse, 756 dense (SXM: 989)"),
    Device("H200", 989.4, "bf16", 141, "H200", "NVIDIA H200 SXM datasheet: 1,979 TFLOPS bf16 sparse, 989 dense"),
    Device("cpu", None, "fp32", None, "CPU", "this machine: fp32 matmul peak measured at estimate time"),
)}
ALIASES = {"a100-80gb": "A100", "a100-40gb": "A100", "cpu": "cpu"}  # price-table and torch names -> DEVICES

# The GPU model's constants (see the module doc; fitted to results/gpu/*.json, measured on one H200).
MFU = 0.34  # of the dense peak, on the work that grows with FLOPs
STEP_FLOOR_S = 0.029  # per training step, whatever the model
STEP_FLOOR_PER_TENSOR_S = 0.00013  # per parameter tensor per training step
FORWARD_FLOOR_FRACTION = 1 / 3  # a forward pass launches about a third of a training step's kernels
CUDA_START_S = 5.0  # CUDA context + weights to the device, per process that uses the GPU
CPU_MFU_IF_NOT_MEASURED = 0.3  # a CPU estimate from a GPU calibration (not measured on any machine)


def parse_devices(values: list[str] | None) -> list[str]:
    """Device names from ``--device`` (repeatable, comma-separated; case-insensitive); all when none given."""
    names = [v.strip() for value in values or [] for v in value.split(",") if v.strip()]
    if values and not names:
        raise UserError(f"--device: no device named (give one or more of {', '.join(DEVICES)}, or leave --device out "
                        "for all)")
    if not names:
        return list(DEVICES)
    known = {d.lower(): d for d in DEVICES} | {k: v for k, v in ALIASES.items()}
    out = []
    for name in names:
        if name.lower() not in known:
            raise UserError(f"--device: unknown device '{name}' (known: {', '.join(DEVICES)})")
        if known[name.lower()] not in out:
            out.append(known[name.lower()])
    return out


def check(cfg, pipeline: str, devices: list[str], steps: int) -> None:
    """Everything that can fail before the calibration starts (raises UserError): each stage's own check, a price per
    device, and what the calibration run would check before its first stage (room for its workers here, this
    machine's price, local data sources), before its temporary directory and MLflow store exist."""
    stages = cfg.stages_of(pipeline)
    for name in stages:
        STAGES[name].check(cfg)
    for device in devices:
        key = DEVICES[device].price_key
        if key not in cfg.cost.prices:
            raise ConfigError(f"cost: no price for device {key} (priced: {', '.join(cfg.cost.prices)}): set "
                              f"cost.prices.{key}=<USD per device-hour>")
    if cfg.model.source == "tiny":  # the model the calibration runs (any other is traced only)
        short = shortened_config(cfg, calibration_overrides(cfg, pipeline, steps)[0])
        check_inputs(short, stages, say=lambda _: None)  # its warnings are the run's own, printed when it runs


# ------------------------------------------------------------------------------------------------ calibration

def calibration_overrides(cfg, pipeline: str, steps: int) -> tuple[list[str], dict]:
    """key=value overrides that shorten ``pipeline``; and what was cut (for the extrapolation)."""
    import torch

    stages = cfg.stages_of(pipeline)
    out, cut = [], {"steps": {}, "train_rows": {}}
    if cfg.resources.use_gpu and not torch.cuda.is_available():
        out.append("resources.use_gpu=false")  # calibrate on this machine's CPU, predict the GPUs
        cut["gpu_config_on_cpu"] = True
    for name in stages:
        if name in TRAINING:
            stage = getattr(cfg, name)
            n = min(stage.max_steps, steps)
            cut["steps"][name] = n
            out += [f"{name}.max_steps={n}", f"{name}.save_steps={max(1, n // 2)}",
                    f"{name}.logging_steps={max(1, min(stage.logging_steps, n // 4))}", f"{name}.warmup_steps=0"]
            if cut.get("gpu_config_on_cpu"):
                out.append(f"{name}.precision=auto")
    if "data" in stages:
        for task, spec in cfg.data.tasks.items():
            size = spec.train_size or (SYNTHETIC_SIZES["train"] if spec.source == "synthetic" else None)
            if size is not None and size > DATA_CAP:
                out.append(f"data.tasks.{task}.train_size={DATA_CAP}")
                cut["train_rows"][task] = size
    if "eval" in stages:
        limit = min(cfg.eval.limit or cfg.eval.batch_size, cfg.eval.batch_size)
        out.append(f"eval.limit={limit}")
    if "dpo" in stages and cfg.dpo.preference.source == "tasks":
        size = cfg.dpo.preference.size
        out.append(f"dpo.preference.size={min(size or cfg.eval.batch_size, cfg.eval.batch_size)}")
    return out, cut


def _timed_display(console):
    class TimedDisplay(Display):
        """The run's console, also noting when each stage began (Unix seconds)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.began: dict[str, float] = {}

        def begin_stage(self, name, *args, **kwargs):
            self.began[name] = time.time()
            return super().begin_stage(name, *args, **kwargs)

    return TimedDisplay(console, capture=True)


def _step_times(client, run_id: str, prefix: str) -> list[tuple[int, float]]:
    """(step, Unix seconds) of each step log of a training stage, from its MLflow metric timestamps."""
    for key in ("learning_rate", "loss", "reward"):
        history = client.get_metric_history(run_id, f"{prefix}/{key}")
        if history:
            return sorted({m.step: m.timestamp / 1000.0 for m in history}.items())
    return []


def training_timeline(record: dict, began: float, logs: list[tuple[int, float]], save_steps: int) -> dict:
    """A training stage's calibration split into start, warm, step, save and tail (see the module doc)."""
    m = record["metrics"]
    name = record["name"]
    steps = int(m[f"{name}/steps"])
    first = float(m.get(f"{name}/first_step_unix") or began)
    end = began + record["wall_seconds"]
    clean, dirty = [], []
    for (a, ta), (b, tb) in zip(logs, logs[1:], strict=False):
        saves = sum(1 for k in range(a, b) if k >= 1 and k % save_steps == 0)
        (dirty if saves else clean).append((b - a, tb - ta, saves))
    if clean:
        step = sum(dt for _, dt, _ in clean) / sum(n for n, _, _ in clean)
    elif logs:
        step = max(1e-6, (logs[-1][1] - first) / max(1, logs[-1][0]))
    else:
        step = max(1e-6, (end - first) / max(1, steps))
    # warm and save are differences of measured intervals: left signed (noise may make one negative), so that the
    # parts add up to the measured stage again
    saves = [(dt - n * step) / s for n, dt, s in dirty]
    save = statistics.median(saves) if saves else 0.0
    warm = logs[0][1] - first - logs[0][0] * step if logs else 0.0
    last = logs[-1][1] if logs else first + steps * step
    busy = float(m.get(f"{name}/step_seconds", 0.0))
    busy_step = min(step, max(0.0, busy - max(0.0, warm)) / steps) if steps else 0.0
    return {"steps": steps, "start_s": max(0.0, first - began), "warm_s": warm, "step_s": step,
            "busy_step_s": busy_step, "host_step_s": step - busy_step, "save_s": save, "tail_s": max(0.0, end - last),
            "wall_s": record["wall_seconds"], "logged_steps": len(logs)}


def peak_flops(threads: int, seconds: float = 1.0) -> float:
    """This machine's fp32 matmul rate (FLOP/s, best of repeated 1024x1024 products on ``threads`` threads)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        n = 1024
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best, stop = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < stop:
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
        return best
    finally:
        torch.set_num_threads(before)


def model_shape(model_dir: str, tasks: dict, trust_remote_code: bool, rows: int = 32) -> dict:
    """Parameter counts (vision / the rest), parameter tensors, and mean tokens per training sample (full
    prompt+answer, prompt only, image tokens) from the model's own processor."""
    import io

    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    vision_cfg = getattr(config, "vision_config", None)
    text_cfg = getattr(config, "text_config", config)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    vision = other = tensors = 0
    for pname, p in model.named_parameters():
        tensors += 1
        if component_of(pname) == "vision":
            vision += p.numel()
        else:
            other += p.numel()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    image_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    full, prompt, image = [], [], []
    for files in tasks.values():
        table = pq.read_table(files["train"], columns=["image", "question", "answer"]).slice(0, rows).to_pylist()
        for row in table:
            picture = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
            ids = processor(text=processor.apply_chat_template(user_turn(row["question"])
                                                               + assistant_turn(row["answer"])),
                            images=[picture])["input_ids"][0]
            asked = processor(text=processor.apply_chat_template(user_turn(row["question"]),
                                                                 add_generation_prompt=True),
                              images=[picture])["input_ids"][0]
            full.append(len(ids))
            prompt.append(len(asked))
            image.append(sum(1 for t in ids if t == image_id))
    image_tokens = statistics.mean(image) if image else 0.0
    scale = getattr(config, "scale_factor", 1) or 1  # Idefics3 pixel shuffle: scale^2 patches per image token
    def layers_width(sub) -> tuple[int, int]:
        return (int(getattr(sub, "num_hidden_layers", 0) or 0), int(getattr(sub, "hidden_size", 0) or 0)) \
            if sub is not None else (0, 0)

    (vision_layers, vision_width), (text_layers, text_width) = layers_width(vision_cfg), layers_width(text_cfg)
    return {"params_vision": vision, "params_other": other, "params": vision + other, "param_tensors": tensors,
            "vision_layers": vision_layers, "vision_width": vision_width, "text_layers": text_layers,
            "text_width": text_width,
            "tokens": statistics.mean(full), "prompt_tokens": statistics.mean(prompt), "image_tokens": image_tokens,
            "patches": image_tokens * scale * scale, "rows_counted": len(full)}


def calibrate(cfg, pipeline: str, steps: int, console=None) -> dict:
    """Run the shortened pipeline here; return what was measured (see the module doc)."""
    import psutil  # the calibration's own imports: Ray, MLflow's client (only when estimating)
    import ray
    from mlflow.tracking import MlflowClient

    overrides, cut = calibration_overrides(cfg, pipeline, steps)
    ray_was_up = ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))
    imports = time.time() - psutil.Process().create_time()
    tmp = tempfile.mkdtemp(prefix="vlmlab-estimate-")  # kept when the calibration fails: its logs are there
    try:
        short = shortened_config(cfg, overrides, Path(tmp))
        result, began, store_s, pipeline_s = run_calibration(short, pipeline, Path(tmp), ray_was_up, console)
        client = MlflowClient(tracking_uri=short.tracking.resolved_uri())
        stages = measured_stages(result, client, short.tracking.experiment, began, cut)
        tasks, model_dir = _tasks_of(result), _model_dir_of(result)
        shape = model_shape(model_dir, tasks, cfg.model.trust_remote_code) if model_dir and tasks else None
    except BaseException:
        if console is not None:
            console.print(f"calibration failed: its run directory and logs are kept in {tmp}", highlight=False)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    outside = pipeline_s - sum(r["wall_seconds"] for r in result["stages"])
    shutdown = stop_own_ray() if not ray_was_up else 0.0
    threads = max(1, int(cfg.resources.cpus_per_worker))
    return {"overrides": overrides, "cut": cut, "stages": stages, "shape": shape,
            "overhead": {"imports_s": imports, "outside_stages_s": outside, "ray_shutdown_s": shutdown,
                         "mlflow_store_create_s": store_s if _new_store(cfg) else 0.0},
            "mlflow_store_create_measured_s": store_s,
            "ray_was_running": ray_was_up, "local_device": _local_kind(short),
            "cpu_peak_flops": peak_flops(threads), "cpu_threads": threads,
            "calibration_wall_s": pipeline_s}


def shortened_config(cfg, overrides: list[str], tmp: Path | None = None):
    """``cfg`` with the calibration's overrides (merged and validated as load_config does); with ``tmp``, writing into
    it (its runs and its own SQLite MLflow store)."""
    raw = cfg.model_dump(mode="json")
    if tmp is not None:
        raw["run_name"] = None
        raw["output_dir"] = str(tmp / "runs")
        raw["tracking"] = {**raw["tracking"], "uri": f"sqlite:///{tmp / 'mlflow.db'}"}
    try:
        return PipelineConfig.model_validate(merge(raw, parse_overrides(overrides)))
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, "the calibration's overrides")) from None


def run_calibration(short, pipeline: str, tmp: Path, ray_was_up: bool, console) -> tuple[dict, dict, float, float]:
    """Run the shortened pipeline; returns its result, when each stage began (Unix seconds), the seconds creating
    its MLflow store took and the pipeline's wall seconds."""
    saved_cache = os.environ.get("HF_DATASETS_CACHE")
    if not ray_was_up:  # Ray's workers start in here: their datasets cache is the temporary one
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf-datasets")
    display = _timed_display(console)
    try:
        with display:  # library output to the calibration run's logs
            # a first run creates its MLflow store (schema migrations: seconds): timed apart, counted only when the
            # user's store does not exist yet
            t = time.perf_counter()
            Tracker(short.tracking.resolved_uri(), short.tracking.experiment)
            store_s = time.perf_counter() - t
            start = time.perf_counter()
            result = run_pipeline(short, pipeline, str(tmp / "runs"), console=console, display=display)
            pipeline_s = time.perf_counter() - start
    finally:
        if saved_cache is None:
            os.environ.pop("HF_DATASETS_CACHE", None)
        else:
            os.environ["HF_DATASETS_CACHE"] = saved_cache
    return result, display.began, store_s, pipeline_s


def measured_stages(result: dict, client, experiment_name: str, began: dict, cut: dict) -> dict:
    """What the calibration measured per stage, from its records and its stages' MLflow step metrics."""
    experiment = client.get_experiment_by_name(experiment_name)
    children = {r.data.tags.get("vlmlab.stage"): r.info.run_id for r in client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result['mlflow_run_id']}'")}
    stages = {}
    for record in result["stages"]:
        name = record["name"]
        entry = {"wall_s": record["wall_seconds"], "devices": record["devices"], "device": record["device"]}
        if name in TRAINING:
            logs = _step_times(client, children[name], name)
            entry |= training_timeline(record, began[name], logs, max(1, cut["steps"][name] // 2))
            entry["generated"] = sum(s["items"] for s in record["outputs"].get("generation_shards", []))
        elif name == "eval":
            busy = sum(s["generation_seconds"] for s in record["outputs"]["shards"])  # summed over the shards
            entry |= {"busy_s": busy, "items": sum(s["items"] for s in record["outputs"]["shards"]),
                      "checkpoints": len(record["outputs"]["scored"])}
        elif name == "data":
            m = record["metrics"]
            entry["rows"] = {k.removeprefix("data/"): v for k, v in m.items() if k.endswith(("_train_size",
                                                                                             "_test_size"))}
        stages[name] = entry
    return stages


def stop_own_ray() -> float:
    """Stop the Ray the calibration started, as `harness run` does at exit; the seconds it took."""
    import ray

    if not ray.is_initialized():
        return 0.0
    t = time.perf_counter()
    raytrain.reap_hung_actors()
    ray.shutdown()
    return time.perf_counter() - t


def _new_store(cfg) -> bool:
    """Whether the user's run would create its MLflow store (a SQLite file not there yet)."""
    uri = cfg.tracking.resolved_uri()
    return uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists()


def _tasks_of(result: dict) -> dict | None:
    for record in result["stages"]:
        if "tasks" in record.get("outputs", {}):
            return record["outputs"]["tasks"]
    return None


def _model_dir_of(result: dict) -> str | None:
    for record in result["stages"]:
        if "model_dir" in record.get("outputs", {}):
            return record["outputs"]["model_dir"]
    return None


def _local_kind(cfg) -> str:
    model = device_model(cfg.resources.use_gpu)  # a price-table name: CPU, T4, A100-80GB...
    return ALIASES.get(model.lower(), model)


# ------------------------------------------------------------------------------------------------- prediction

def forward_flops(shape: dict, text_tokens: float) -> float:
    """Model FLOPs of one forward pass over a sample of ``text_tokens`` tokens and its image: 2 x parameters x
    tokens for the matrix products (the vision encoder over the image's patches) plus attention, 4 x layers x
    sequence^2 x width (the count benchmarks/gpu_throughput.py uses; a backward pass is twice a forward)."""
    patches = shape["patches"]
    matmul = shape["params_other"] * text_tokens + shape["params_vision"] * patches
    attention = shape["vision_layers"] * patches ** 2 * shape["vision_width"] \
        + shape["text_layers"] * text_tokens ** 2 * shape["text_width"]
    return 2 * matmul + 4 * attention


def step_flops(name: str, stage_cfg, shape: dict, plans: dict | None = None) -> float:
    """Model FLOPs of one optimizer step of training stage ``name`` on one worker: counted in its traced step
    (``plans``, stages/support/memory.py) where there is one, else the forward passes its module declares per sample
    (``step_cost``) over the tokens they read."""
    samples = stage_cfg.batch_size * stage_cfg.gradient_accumulation_steps
    if plans and name in plans:
        return plans[name].flops_per_sample * samples
    cost = STAGES[name].step_cost(stage_cfg)
    tokens = shape["tokens"] if cost.tokens == "sample" else shape["prompt_tokens"] + cost.new_tokens
    return cost.passes * forward_flops(shape, tokens) * stage_cfg.batch_size * stage_cfg.gradient_accumulation_steps


def item_flops(shape: dict, new_tokens: int, plans: dict | None = None) -> float:
    """Model FLOPs of generating one answer: counted in the traced generation where there is one, else prefill +
    ``new_tokens`` decode steps ~ one forward."""
    if plans and "eval" in plans:
        return plans["eval"].flops_per_sample
    return forward_flops(shape, shape["prompt_tokens"] + new_tokens)


def step_floor(shape: dict) -> float:
    return STEP_FLOOR_S + STEP_FLOOR_PER_TENSOR_S * shape["param_tensors"]


@dataclass
class Rates:
    """How a device runs the device work: FLOP/s at the assumed MFU, the per-step floor; None: measured here."""
    flops_per_s: float
    floor_s: float
    cuda_start_s: float


def device_rates(device: str, calib: dict) -> Rates | None:
    if device == calib["local_device"]:
        return None
    spec = DEVICES[device]
    if device == "cpu":  # from a GPU calibration: this machine's measured peak, an assumed MFU, no floor
        return Rates(calib["cpu_peak_flops"] * CPU_MFU_IF_NOT_MEASURED, 0.0, 0.0)
    return Rates(spec.peak_tflops * 1e12 * MFU, step_floor(calib["shape"]), CUDA_START_S)


def train_rows(calib: dict) -> dict[str, int]:
    """Training rows per task of the full run: the configured size where the calibration cut it (and the source
    had at least DATA_CAP rows), else what the calibration loaded."""
    rows = calib["stages"].get("data", {}).get("rows", {})
    out = {}
    for key, n in rows.items():
        if key.endswith("_train_size"):
            task = key.removesuffix("_train_size")
            cut = calib["cut"]["train_rows"].get(task)
            out[task] = int(cut if cut is not None and n >= DATA_CAP else n)
    return out


def _saves_between(steps: int, every: int) -> int:
    return max(0, (steps - 1) // every)


def predict_stage(name: str, cfg, calib: dict, rates: Rates | None) -> dict:
    """Predicted wall seconds of stage ``name`` of the full config (``cfg``) on a device (``rates``)."""
    stage = calib["stages"][name]
    workers = cfg.resources.workers
    shape = calib["shape"]
    if name == "data":
        cal_rows = sum(stage["rows"].values()) or 1
        real_rows = sum(train_rows(calib).values()) + sum(v for k, v in stage["rows"].items()
                                                         if k.endswith("_test_size"))
        return {"wall_s": stage["wall_s"] * real_rows / cal_rows, "device_s": 0.0}
    if name == "eval":
        busy = stage["busy_s"] / workers
        items = eval_items(cfg, calib)
        fixed = stage["wall_s"] - busy
        if rates is None:
            device = busy * items / max(1, stage["items"])
            return {"wall_s": fixed + device, "device_s": device}
        device = generation_seconds(items, cfg.eval, shape, rates, workers, plans=calib.get("plans"))
        jobs = stage["checkpoints"]  # one Ray task per checkpoint and shard, `workers` at a time
        return {"wall_s": fixed + device + jobs * rates.cuda_start_s, "device_s": device}
    if name in TRAINING:
        stage_cfg = getattr(cfg, name)
        steps = stage_cfg.max_steps
        start = stage["start_s"]
        start += generation_extra(name, cfg, calib, rates)
        if rates is None:
            per_step, warm, cuda = stage["step_s"], stage["warm_s"], 0.0
            device = steps * stage["busy_step_s"]
        else:
            busy = rates.floor_s + step_flops(name, stage_cfg, shape, calib.get("plans")) / rates.flops_per_s
            new_tokens = STAGES[name].step_cost(stage_cfg).new_tokens
            if new_tokens:  # generating inside the step (GRPO): one forward floor per new token
                busy += (new_tokens + 1) * rates.floor_s * FORWARD_FLOOR_FRACTION
            per_step, warm, cuda = stage["host_step_s"] + busy, 0.0, rates.cuda_start_s
            device = steps * busy
        wall = (start + cuda + warm + steps * per_step + _saves_between(steps, stage_cfg.save_steps) * stage["save_s"]
                + stage["tail_s"])
        return {"wall_s": wall, "device_s": device}
    return {"wall_s": stage["wall_s"], "device_s": 0.0}  # model, or a stage with no model of its own


def eval_items(cfg, calib: dict) -> int:
    """Items the full eval generates: per task min(test rows, eval.limit), for every checkpoint scored."""
    rows = calib["stages"].get("data", {}).get("rows", {})
    per_checkpoint = 0
    for task in cfg.data.tasks:
        test = int(rows.get(f"{task}_test_size", cfg.data.tasks[task].test_size or 0))
        per_checkpoint += min(test, cfg.eval.limit) if cfg.eval.limit else test
    return per_checkpoint * calib["stages"]["eval"]["checkpoints"]


def generation_seconds(items: int, eval_cfg, shape: dict, rates: Rates, workers: int,
                       batches: int | None = None, plans: dict | None = None) -> float:
    """Greedy answers on a modelled device: a forward floor per new token per batch, plus the FLOPs."""
    batches = batches if batches is not None else math.ceil(items / eval_cfg.batch_size)
    floor = batches * (eval_cfg.max_new_tokens + 1) * rates.floor_s * FORWARD_FLOOR_FRACTION
    return (floor + items * item_flops(shape, eval_cfg.max_new_tokens, plans) / rates.flops_per_s) / workers


def generation_extra(name: str, cfg, calib: dict, rates: Rates | None) -> float:
    """A stage's generation before training (DPO's on-policy answers: ``generated_items`` of its module) at full
    size, minus what its calibration already generated."""
    declared = getattr(STAGES[name], "generated_items", None)
    if declared is None:
        return 0.0
    full = declared(cfg, sum(train_rows(calib).values()))
    if not full:
        return 0.0
    done = calib["stages"][name].get("generated", 0)
    ev = calib["stages"].get("eval")
    workers = cfg.resources.workers
    if rates is None:
        if not ev or not ev["items"]:
            return 0.0  # no eval measured to take the rate from
        return max(0.0, full - done) * ev["busy_s"] / workers / ev["items"]
    here = done * ev["busy_s"] / workers / ev["items"] if ev and ev["items"] else 0.0
    return generation_seconds(full, cfg.eval, calib["shape"], rates, workers) + rates.cuda_start_s - here


def predict(cfg, pipeline: str, calib: dict, device: str) -> dict:
    rates = device_rates(device, calib)
    spec = DEVICES[device]
    stages = {name: predict_stage(name, cfg, calib, rates) for name in cfg.stages_of(pipeline)}
    overhead = sum(calib["overhead"].values())
    total = overhead + sum(s["wall_s"] for s in stages.values())
    if device == "cpu":
        held = cfg.resources.workers * cfg.resources.cpus_per_worker
    else:
        held = cfg.resources.workers * cfg.resources.gpus_per_worker
    price = cfg.cost.prices[spec.price_key]
    hours = total * held / 3600.0
    out = {"device": device, "measured_here": rates is None, "stages": stages, "overhead_s": overhead,
           "total_s": total, "devices": held, "accelerator_hours": hours, "usd_per_device_hour": price,
           "usd": hours * price, "price_key": spec.price_key,
           "peak_tflops": spec.peak_tflops if spec.peak_tflops else calib["cpu_peak_flops"] / 1e12,
           "mfu": None if rates is None else (MFU if device != "cpu" else CPU_MFU_IF_NOT_MEASURED),
           "step_floor_s": None if rates is None else rates.floor_s}
    shape = calib["shape"]
    if spec.memory_gib and shape and shape["params"] * 16 > spec.memory_gib * 2 ** 30:
        out["warning"] = (f"{shape['params'] / 1e9:.1f}B parameters need ~{shape['params'] * 16 / 2 ** 30:.0f} GiB "
                          f"for weights, gradients and AdamW state: more than the {spec.name}'s {spec.memory_gib} GiB")
    return out


def achieved_here(cfg, calib: dict) -> dict[str, float]:
    """FLOP/s the calibration's training steps reached on this machine (per worker), by stage."""
    shape = calib["shape"]
    out = {}
    for name, stage in calib["stages"].items():
        if name in TRAINING and stage["busy_step_s"] > 0 and shape:
            out[name] = step_flops(name, getattr(cfg, name), shape, calib.get("plans")) / stage["busy_step_s"]
    return out


def assumptions(cfg, pipeline: str, calib: dict, devices: list[str]) -> list[str]:
    shape = calib["shape"]
    lines = []
    steps = ", ".join(f"{k} {v} steps" for k, v in calib["cut"]["steps"].items())
    lines.append(f"calibration here ({calib['local_device']}, {calib['calibration_wall_s']:.0f} s): the pipeline "
                 f"shortened by {' '.join(calib['overrides'])}" + (f" ({steps})" if steps else ""))
    for name, stage in calib["stages"].items():
        if name in TRAINING:
            lines.append(f"measured {name}: start {stage['start_s']:.1f} s, {stage['step_s'] * 1000:.0f} ms/step "
                         f"({stage['busy_step_s'] * 1000:.0f} ms inside optimizer steps), first steps "
                         f"{stage['warm_s']:+.1f} s, checkpoint {stage['save_s']:.2f} s, end {stage['tail_s']:.1f} s")
        elif name == "eval":
            lines.append(f"measured eval: {stage['items']} items, {stage['busy_s'] / max(1, stage['items']) * 1000:.1f}"
                         f" ms/item generating, {stage['wall_s'] - stage['busy_s']:.1f} s fixed; full eval: "
                         f"{eval_items(cfg, calib)} items")
    o = calib["overhead"]
    store = (f", {o['mlflow_store_create_s']:.1f} s creating the MLflow store (it does not exist yet)"
             if o["mlflow_store_create_s"] else " (the MLflow store exists: not created)")
    lines.append(f"measured outside the stages: {o['imports_s']:.1f} s start-up and imports, "
                 f"{o['outside_stages_s']:.1f} s MLflow/manifest/results, {o['ray_shutdown_s']:.1f} s Ray shutdown"
                 + store)
    if shape:
        achieved = achieved_here(cfg, calib)
        peak = calib["cpu_peak_flops"]
        rate = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in achieved.items())
        lines.append(f"model: {shape['params'] / 1e6:.2f}M parameters ({shape['params_vision'] / 1e6:.2f}M vision), "
                     f"{shape['param_tensors']} tensors; {shape['tokens']:.1f} tokens per training sample "
                     f"({shape['image_tokens']:.0f} image tokens, {shape['patches']:.0f} patches), "
                     f"{shape['prompt_tokens']:.1f} per prompt (the processor on {shape['rows_counted']} rows)")
        counted = ("counted in each stage's traced step (FlopCounterMode, stages/support/memory.py)"
                   if calib.get("plans") else "a forward = 2 x params x tokens (vision: x patches) + attention; a "
                   "trained sample 3 forwards (DPO 8 per pair, GRPO 4 per completion), a generated item 1")
        lines.append(f"FLOPs: {counted}; this machine: fp32 "
                     f"matmul peak {peak / 1e9:.1f} GFLOP/s on {calib['cpu_threads']} threads (measured)"
                     + (f", training reached {rate}" if rate else "")
                     + (f" (MFU {max(achieved.values()) / peak:.2f})" if achieved and peak else ""))
    if any(device_rates(d, calib) is not None and d != "cpu" for d in devices):
        floor = step_floor(shape) if shape else STEP_FLOOR_S
        lines.append(f"GPUs (assumed): step = host work as measured here + {floor * 1000:.0f} ms floor "
                     f"({STEP_FLOOR_S * 1000:.0f} ms + {STEP_FLOOR_PER_TENSOR_S * 1000:.2f} ms x parameter tensors) + "
                     f"FLOPs / (dense peak x MFU {MFU}); a forward {FORWARD_FLOOR_FRACTION:.2f} of the floor per new "
                     f"token; +{CUDA_START_S:.0f} s CUDA start per GPU process; fitted to H200 measurements "
                     "(results/gpu/), the same on every GPU; fixed overheads as measured here")
        peaks = ", ".join(f"{d} {DEVICES[d].peak_tflops:g}" for d in devices if DEVICES[d].peak_tflops)
        lines.append(f"peak TFLOP/s ({'bf16; T4 fp16' if 'T4' in devices else 'bf16'}, dense): {peaks} "
                     "(datasheets: harness/estimate.py DEVICES)")
    lines.append("$ = predicted wall x devices held x cost.prices (runtime/cost.py PRICE_TABLE): a device rented for "
                 "the whole run; the harness's own cost/* counts only the time stages hold devices")
    if cfg.cost.price_per_hour is not None:
        lines.append(f"cost.price_per_hour ({cfg.cost.price_per_hour}) is not used: it prices the device a run "
                     "detects; each device here is priced from cost.prices")
    if any(getattr(cfg, n).grades.enabled for n in cfg.stages_of(pipeline) if n in TRAINING):
        lines.append("GradES is on: it may stop training early; the prediction is for all max_steps (an upper bound)")
    if calib["cut"].get("gpu_config_on_cpu"):
        lines.append("the config asks for a GPU this machine lacks: calibrated on the CPU (resources.use_gpu=false)")
    if calib["ray_was_running"]:
        lines.append("Ray was already running: its start-up is not in the calibration's first training stage")
    return lines


# ------------------------------------------------------------------------------ memory, and models traced, not run

# A model other than the tiny default is not calibrated here (its steps on this CPU would take minutes each): its
# device work comes from its traced step (stages/support/memory.py: FLOPs, peak memory; this machine's seconds), and
# the host overheads of a stage from the tiny default's calibration here (results/estimate.json, 2026-11-30, 2 cores:
# sft start 16.9 s, end 2.6 s, 52 ms of host work a step; data 0.26 ms a row; eval 7.5 s fixed; 7.6 s outside stages).
HOST = {"start_s": 16.9, "tail_s": 2.6, "host_step_s": 0.052, "data_s_per_row": 0.26e-3, "eval_fixed_s": 7.5,
        "outside_s": 7.6, "model_s": 2.4}
WRITE_BYTES_PER_S = 0.5e9  # a checkpoint's weights and optimizer state to local disk (assumed)


def plans(cfg, stages: list[str], timed: bool) -> tuple[dict, dict]:
    """The memory plan of each device stage (stages/support/fit.py), and the model's parameter count and tensors."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    rows = fit.standin_rows(cfg)
    synthetic_only = all(spec.source == "synthetic" for spec in cfg.data.tasks.values())
    rows_from = "the run's synthetic rows" if synthetic_only else "synthetic stand-in rows"
    with tempfile.TemporaryDirectory(prefix="vlmlab-estimate-plan-") as tmp:
        shell = fit.model_shell(cfg, rows, Path(tmp) / "model")
        if shell is None:
            return {}, {}
        traced = fit.plans_for(cfg, stages, shell, rows, rows_from=rows_from, timed=timed)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(shell))
        params = list(model.parameters())
    return traced, {"params": sum(p.numel() for p in params), "param_tensors": len(params)}


def device_budget(device: str, cfg) -> float:
    """Bytes a stage may hold on ``device`` (its memory less the CUDA context and slack; this machine's RAM)."""
    import psutil

    if device == "cpu":
        return float(cfg.resources.device_memory_gb * fit.GIB if cfg.resources.device_memory_gb
                     else psutil.virtual_memory().total)
    return fit.usable_bytes(DEVICES[device].memory_gib)


def memory_view(cfg, stages: list[str], traced: dict, device: str) -> dict:
    """Per device stage: the predicted peak at the configured batch, whether it fits, the batch fit:auto picks."""
    budget = device_budget(device, cfg)
    out = {}
    for name in stages:
        if name in TRAINING and name in traced:
            section = getattr(cfg, name)
            plan = traced[name]
            peak = plan.peak(section.batch_size, section.gradient_accumulation_steps)
            choice = fit.training_choice(name, section, {False: plan}, budget)
            out[name] = {"peak_gib": peak / fit.GIB, "fits": peak <= budget, "budget_gib": budget / fit.GIB,
                         "fit_batch": choice.batch_size if choice else None,
                         "fit_accumulation": choice.gradient_accumulation_steps if choice else None,
                         "fit_peak_gib": choice.predicted_gib if choice else None,
                         "step_flops": plan.flops(section.batch_size, section.gradient_accumulation_steps)}
        elif name == "eval" and "eval" in traced:
            generation = [traced[k] for k in ("eval", "dpo-generate") if k in traced]
            peak = max(p.peak(cfg.eval.batch_size) for p in generation)
            batch = next((b for b in range(cfg.eval.batch_size, 0, -1)
                          if all(p.peak(b) <= budget for p in generation)), None)
            out[name] = {"peak_gib": peak / fit.GIB, "fits": peak <= budget, "budget_gib": budget / fit.GIB,
                         "fit_batch": batch, "fit_accumulation": None,
                         "fit_peak_gib": max(p.peak(batch) for p in generation) / fit.GIB if batch else None,
                         "step_flops": traced["eval"].flops(cfg.eval.batch_size)}
    return out


def traced_stage(name: str, cfg, stages: list[str], traced: dict, info: dict, device: str, memory: dict,
                 rows: dict) -> dict:
    """Wall seconds of stage ``name`` on ``device`` from its traced step (no calibration run of the model here)."""
    workers = cfg.resources.workers
    rates = None if device == "cpu" else Rates(DEVICES[device].peak_tflops * 1e12 * MFU,
                                              STEP_FLOOR_S + STEP_FLOOR_PER_TENSOR_S * info["param_tensors"],
                                              CUDA_START_S)
    if name == "data":
        return {"wall_s": HOST["data_s_per_row"] * sum(rows.values()), "device_s": 0.0}
    if name == "model":  # building (random weights) or reading it, and writing it once
        return {"wall_s": HOST["model_s"] + info["params"] * 4 / WRITE_BYTES_PER_S, "device_s": 0.0}
    view = memory.get(name, {})
    if name in TRAINING and name in traced:
        section = getattr(cfg, name)
        plan = traced[name]
        batch = view.get("fit_batch") or section.batch_size
        accumulation = view.get("fit_accumulation") or section.gradient_accumulation_steps
        host = accumulation * (HOST["host_step_s"] + plan.collate_seconds * batch)
        if rates is None:
            busy = plan.seconds_per_sample * batch * accumulation
        else:
            busy = accumulation * rates.floor_s + plan.flops(batch, accumulation) / rates.flops_per_s
        saves = _saves_between(section.max_steps, section.save_steps) * info["params"] * 4 / WRITE_BYTES_PER_S
        start = HOST["start_s"] + (rates.cuda_start_s if rates else 0.0)
        if "dpo-generate" in traced and name == "dpo":
            train = sum(n for key, n in rows.items() if key.endswith("_train"))
            pairs = min(cfg.dpo.preference.size or train, train)
            start += _generation(traced["dpo-generate"], pairs, cfg.eval.batch_size, rates) / workers
        wall = start + section.max_steps * (host + busy) + saves + HOST["tail_s"]
        return {"wall_s": wall, "device_s": section.max_steps * busy}
    if name == "eval" and "eval" in traced:
        tests = sum(min(spec.test_size or 300, cfg.eval.limit or 10 ** 9) for spec in cfg.data.tasks.values())
        checkpoints = sum(1 for s in stages if s in TRAINING) + (1 if cfg.eval.score_base else 0)
        device_s = _generation(traced["eval"], tests * checkpoints, view.get("fit_batch") or cfg.eval.batch_size,
                               rates) / workers
        return {"wall_s": HOST["eval_fixed_s"] + device_s + (checkpoints * rates.cuda_start_s if rates else 0.0),
                "device_s": device_s}
    return {"wall_s": 0.0, "device_s": 0.0}


def configured_rows(cfg) -> dict[str, int]:
    """Rows per task and split the data stage makes (``<task>_train`` / ``<task>_test``)."""
    out = {}
    for task, spec in cfg.data.tasks.items():
        out[f"{task}_train"] = spec.train_size or SYNTHETIC_SIZES["train"]
        out[f"{task}_test"] = spec.test_size or SYNTHETIC_SIZES["test"]
    return out


def traced_predict(cfg, pipeline: str, traced: dict, info: dict, device: str) -> dict:
    """``predict`` for a model traced, not calibrated here."""
    stages = cfg.stages_of(pipeline)
    memory = memory_view(cfg, stages, traced, device)
    rows = configured_rows(cfg)
    walls = {name: traced_stage(name, cfg, stages, traced, info, device, memory, rows) for name in stages}
    total = HOST["outside_s"] + sum(w["wall_s"] for w in walls.values())
    spec = DEVICES[device]
    held = cfg.resources.workers * (cfg.resources.cpus_per_worker if device == "cpu" else cfg.resources.gpus_per_worker)
    price = cfg.cost.prices[spec.price_key]
    hours = total * held / 3600.0
    fits = all(v["fits"] or v["fit_batch"] for v in memory.values())
    return {"device": device, "measured_here": False, "stages": walls, "overhead_s": HOST["outside_s"],
            "total_s": total, "devices": held, "accelerator_hours": hours, "usd_per_device_hour": price,
            "usd": hours * price, "price_key": spec.price_key,
            "peak_tflops": spec.peak_tflops or (peak_flops(max(1, int(cfg.resources.cpus_per_worker))) / 1e12),
            "mfu": MFU if device != "cpu" else None, "memory": memory, "fits": fits,
            "basis": "traced step" + ("" if device != "cpu" else ", this machine's seconds")}


def _generation(plan, items: int, batch: int, rates: Rates | None) -> float:
    """Greedy generation of ``items`` answers: this machine's traced seconds, or a floor per new token per batch
    plus the FLOPs on a modelled GPU."""
    host = items * plan.collate_seconds
    if rates is None:
        return host + items * plan.seconds_per_sample
    batches = math.ceil(items / max(1, batch))
    floors = batches * (plan.new_tokens + 1) * rates.floor_s * FORWARD_FLOOR_FRACTION
    return host + floors + items * plan.flops_per_sample / rates.flops_per_s


def estimate(cfg, pipeline: str, devices: list[str], steps: int, console=None) -> dict:
    """Predict ``pipeline`` on each of ``devices``: memory from each device stage's traced step; time from a short
    calibration run of the pipeline here (the tiny default), or, for any other model, from its traced step (no step of
    the real model runs). Raises UserError before any work."""
    check(cfg, pipeline, devices, steps)
    stages = cfg.stages_of(pipeline)
    calibrated = cfg.model.source == "tiny"
    if console is not None:
        console.print("tracing a step of each device stage (the memory plan)" + ("" if calibrated else
                      ", this model's steps are traced, not run") + "...", highlight=False)
    traced, info = plans(cfg, stages, timed=not calibrated and "cpu" in devices)
    constants = {"mfu": MFU, "step_floor_s": STEP_FLOOR_S, "step_floor_per_tensor_s": STEP_FLOOR_PER_TENSOR_S,
                 "forward_floor_fraction": FORWARD_FLOOR_FRACTION, "cuda_start_s": CUDA_START_S,
                 "data_cap": DATA_CAP, "reserve_gib": fit.RESERVE_GIB, "slack": fit.SLACK}
    peaks = {d.name: {"tflops": d.peak_tflops, "precision": d.precision, "source": d.source} for d in DEVICES.values()}
    plan_records = {name: plan.to_dict() | {"traced": None} for name, plan in traced.items()}
    if not calibrated:
        if not traced:
            raise UserError(f"harness estimate: the model of model.source={cfg.model.source} is not here to trace "
                            "(a hub id outside the local cache, or compose): run its model stage first, or give a "
                            "local checkpoint directory")
        return {"pipeline": pipeline, "stages": stages, "basis": "traced",
                "devices": {d: traced_predict(cfg, pipeline, traced, info, d) for d in devices},
                "assumptions": traced_assumptions(cfg, traced, info, devices), "plans": plan_records,
                "model": info, "constants": constants | {"host": HOST}, "peaks": peaks}
    calib = calibrate(cfg, pipeline, steps, console)
    calib["plans"] = traced
    predicted = {}
    for d in devices:
        predicted[d] = predict(cfg, pipeline, calib, d)
        predicted[d]["memory"] = memory_view(cfg, stages, traced, d)
        predicted[d]["fits"] = all(v["fits"] or v["fit_batch"] for v in predicted[d]["memory"].values())
    lines = assumptions(cfg, pipeline, calib, devices) + memory_assumptions(traced)
    calib["plans"] = plan_records  # JSON-able from here on
    return {"pipeline": pipeline, "stages": stages, "basis": "calibrated", "devices": predicted, "assumptions": lines,
            "calibration": calib, "plans": plan_records, "model": info, "constants": constants, "peaks": peaks}


def memory_assumptions(traced: dict) -> list[str]:
    if not traced:
        return []
    first = next(iter(traced.values()))
    return [f"memory: each device stage's step traced here with real tensors at a few layers (torch's MemTracker, "
            f"FlopCounterMode; stages/support/memory.py) and extrapolated in depth and batch, on {first.rows} "
            f"(longest row {first.tokens} tokens); half precision counts activations at 2 bytes (mixed precision); "
            f"a device's usable memory is its total less {fit.RESERVE_GIB} GiB (CUDA context), x {fit.SLACK} "
            "(allocator slack); fit: the batch resources.fit=auto picks there"]


def traced_assumptions(cfg, traced: dict, info: dict, devices: list[str]) -> list[str]:
    lines = [f"model: {info['params'] / 1e6:.1f}M parameters, {info['param_tensors']} tensors "
             f"(model.source={cfg.model.source}" + (f", {cfg.model.architecture}" if cfg.model.architecture else "")
             + "); not calibrated here: each stage's step is traced, not run"]
    for name, plan in traced.items():
        lines.append(f"traced {name}: {plan.flops_per_sample / 1e9:.0f} GFLOP per sample, "
                     f"{plan.tokens} tokens, {plan.collate_seconds * 1000:.0f} ms of host work per sample (processor)"
                     + (f", {plan.seconds_per_sample:.1f} s per sample on this CPU" if plan.timed else ""))
    lines += memory_assumptions(traced)
    lines.append(f"host overheads from the tiny default's calibration here (results/estimate.json): stage start "
                 f"{HOST['start_s']} s, end {HOST['tail_s']} s, {HOST['host_step_s'] * 1000:.0f} ms host work a step, "
                 f"data {HOST['data_s_per_row'] * 1000:.2f} ms a row, eval {HOST['eval_fixed_s']} s fixed, "
                 f"{HOST['outside_s']} s outside stages; checkpoints written at {WRITE_BYTES_PER_S / 1e9:.1f} GB/s")
    if any(d != "cpu" for d in devices):
        lines.append(f"GPUs (assumed): a micro-batch's floor {STEP_FLOOR_S * 1000:.0f} ms + "
                     f"{STEP_FLOOR_PER_TENSOR_S * 1000:.2f} ms x parameter tensors, + FLOPs / (dense peak x MFU "
                     f"{MFU}); "
                     f"generation {FORWARD_FLOOR_FRACTION:.2f} of the floor per new token per batch; "
                     f"+{CUDA_START_S:.0f} s CUDA start per GPU process (fitted to H200 measurements, results/gpu/)")
    lines.append("$ = predicted wall x devices held x cost.prices (runtime/cost.py PRICE_TABLE)")
    return lines


# ------------------------------------------------------------------------------------------------- rendering

def render(result: dict, console) -> None:
    from rich.table import Table


    devices = result["devices"]
    table = Table(title=f"estimate · pipeline {result['pipeline']}")
    for col in ("device", "wall", "accel-h", "USD/h", "USD", "basis"):
        table.add_column(col, justify="left" if col in ("device", "basis") else "right")
    for name, d in devices.items():
        basis = d.get("basis") or ("measured here" if d["measured_here"]
                                   else f"{d['peak_tflops']:g} TFLOP/s x MFU {d['mfu']}")
        table.add_row(name, duration(d["total_s"]), f"{d['accelerator_hours']:.4f}", f"{d['usd_per_device_hour']:.3f}",
                      f"{d['usd']:.4f}", basis)
    console.print(table)
    stages = Table(title="predicted wall time per stage")
    stages.add_column("stage")
    for name in devices:
        stages.add_column(name, justify="right")
    for stage in result["stages"]:
        stages.add_row(stage, *[f"{devices[d]['stages'][stage]['wall_s']:.1f}s" for d in devices])
    stages.add_row("outside stages", *[f"{devices[d]['overhead_s']:.1f}s" for d in devices])
    stages.add_row("total", *[f"{devices[d]['total_s']:.1f}s" for d in devices], style="bold")
    console.print(stages)
    memory = Table(title="predicted peak memory per stage (GB, at the configured batch; fit: the batch "
                         "resources.fit=auto picks)")
    memory.add_column("stage")
    for name in devices:
        memory.add_column(name, justify="right")
    for stage in result["stages"]:
        cells = []
        for d in devices.values():
            view = d.get("memory", {}).get(stage)
            if view is None:
                cells.append("-")
                continue
            verdict = "fits" if view["fits"] else (f"fit: batch {view['fit_batch']}" if view["fit_batch"]
                                                   else "does not fit")
            cells.append(f"{view['peak_gib']:.1f} / {view['budget_gib']:.0f} {verdict}")
        if any(c != "-" for c in cells):
            memory.add_row(stage, *cells)
    if memory.row_count:
        console.print(memory)
    for d in devices.values():
        if "warning" in d:
            console.print(Text.assemble(("warning:", "yellow"), f" {d['device']}: {d['warning']}"), highlight=False)
        if not d.get("fits", True):
            console.print(Text.assemble(("warning:", "yellow"), f" {d['device']}: a stage does not fit at batch 1 (see "
                                        "the memory table): the run would stop before any work"), highlight=False)
    console.print("assumptions:")
    for line in result["assumptions"]:
        console.print(f"  - {line}", highlight=False, soft_wrap=True)
