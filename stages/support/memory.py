"""The memory plan: peak memory, FLOPs and (here) seconds of a device stage's step, from a traced real step.

A training stage's step is the stage's own TRL trainer (its module's ``make_trainer``) taking one optimizer step on
one sample of the stage's rows; generation (eval, DPO's on-policy answers) is ``model.generate`` on one prompt with
the answer's full length. Each is run with real tensors on this machine's CPU, under torch's memory tracker
(runtime/torch_private.py: bytes by category at the peak) and ``FlopCounterMode``, on the model shortened to a few
layers: vision and text depths (1, 1), (2, 1), (1, 2). Every category is linear in each tower's depth (a layer's
weights, optimizer state and activations are those of the next layer), so three traced steps give it at full depth:
``c0 + cv * vision layers + ct * text layers``. No tower is traced empty: with no text layer the answer's loss would
not reach the image (no attention mixes them), and the step would skip the vision tower's backward pass. In the
batch, parameters, buffers, gradients and optimizer state stay and activations, temporaries and inputs grow in
proportion (checked: 2.00x and 1.98x for a doubled batch).

Precision: every step is traced in fp32 (a CPU without bf16 instructions, like this project's, runs a bf16 step ~40x
slower: 97 s against 2.5 s for one SmolVLM vision layer on 5 tiles). A half-precision stage (fp16, bf16: mixed
precision, weights, gradients and optimizer state in fp32) counts the batch's activations and temporaries at half
their fp32 bytes, as autocast makes the matmul and attention outputs a step keeps two-byte; the fp32 logits of the
loss make that a slight underestimate, which scripts/gpu-check measures on a GPU. The prediction is what torch
allocates (``torch.cuda.max_memory_allocated`` on a GPU); the CUDA context and the caching allocator's slack come on
top (``fit.RESERVE_GIB``, ``fit.SLACK``).

Rows: the stage's data when it exists, else rows of the configured tasks' synthetic generators at the run's image
size, a stand-in for hub data (recorded in the plan). The longest row is traced: a padded batch costs its longest.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime import torch_private
from runtime.config import ResourcesConfig
from stages.support import training
from stages.support.generate import pil
from stages.support.settings import TrainSettings
from stages.support.training import user_turn

TRACE_DEPTHS = ((1, 1), (2, 1), (1, 2))  # (vision layers, text layers)
BATCH_CATEGORIES = ("Activation", "Temp", "Other")  # grow with the batch; the rest is the model and its optimizer
HALF = ("fp16", "bf16")
HALVED = ("Activation", "Temp")  # two-byte under autocast (the inputs, "Other", stay as the processor makes them)
_LIBC = ctypes.CDLL(None)  # the C library this process runs on (glibc: mallopt, malloc_trim)


@dataclass
class Plan:
    """What one step of a stage holds and costs at full depth, per micro-batch size ``b``:
    ``fixed + b * per_sample`` bytes (plus ``gradients`` kept between micro-batches when accumulating)."""
    stage: str
    kind: str  # "train" or "generate"
    fixed: float  # bytes at the forward/backward peak that the batch does not change: parameters, buffers, optimizer
    # state, the gradients made by then
    per_sample: float  # bytes per sample of the micro-batch at that peak: activations, temporaries, inputs
    gradients: float  # bytes of gradients after the backward pass (held across accumulation steps)
    update: float  # bytes at the optimizer step's peak (parameters, gradients, optimizer state): batch-independent
    flops_per_sample: float  # model FLOPs of the step per sample (forward and backward; or the generation)
    seconds_per_sample: float  # this machine's CPU: a plain step's (``timed``), else the traced one's
    categories: dict = field(default_factory=dict)  # full-depth bytes by category at batch 1
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    rows: str = ""  # where the traced row came from
    tokens: int = 0  # the traced sample's sequence length (prompt and answer)
    new_tokens: int = 0  # generation: the answer's length
    collate_seconds: float = 0.0  # host seconds per sample making the batch (the processor: tiles, tokens)
    timed: bool = False
    traced: list = field(default_factory=list)  # the raw traced steps (depths, bytes by category, FLOPs, seconds)

    def peak(self, batch: int, accumulation: int = 1) -> float:
        """The step's peak: the forward/backward's (gradients of earlier micro-batches kept when accumulating) or
        the optimizer step's, whichever is higher."""
        return max(self.fixed + batch * self.per_sample + (self.gradients if accumulation > 1 else 0.0), self.update)

    def flops(self, batch: int, accumulation: int = 1) -> float:
        return self.flops_per_sample * batch * accumulation

    def to_dict(self) -> dict:
        return asdict(self)


def _extrapolate(points: dict[tuple[int, int], float], vision: int, text: int) -> float:
    """c0 + cv * vision + ct * text, solved from the values at TRACE_DEPTHS."""
    cv = points[(2, 1)] - points[(1, 1)]
    ct = points[(1, 2)] - points[(1, 1)]
    return points[(1, 1)] + cv * (vision - 1) + ct * (text - 1)


def _depths(model_dir: Path) -> tuple[int, int]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers


def _shortened(model_dir: Path, vision: int, text: int, seed: int):
    """The model of ``model_dir``'s config with ``vision``/``text`` layers, fp32, seeded random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    config.vision_config.num_hidden_layers = vision
    config.text_config.num_hidden_layers = text
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32)


def _summed(points: list[dict], key: str, vision: int, text: int) -> float:
    return _extrapolate({(p["vision"], p["text"]): p[key] for p in points}, vision, text)


def _plan(stage: str, kind: str, points: list[dict], model_dir: Path, **extra) -> Plan:
    vision, text = _depths(model_dir)
    half = extra.get("precision") in HALF
    categories = {c: max(0.0, _extrapolate({(p["vision"], p["text"]): p["bytes"].get(c, 0) for p in points},
                                           vision, text)) * (0.5 if half and c in HALVED else 1.0)
                  for c in points[0]["bytes"] if c != "Total"}
    per_sample = sum(categories.get(c, 0.0) for c in BATCH_CATEGORIES)
    flops = _summed(points, "flops", vision, text)
    # this machine's rate over the traced steps (all their FLOPs over all their seconds): a step's time is its FLOPs at
    # that rate. Not the seconds extrapolated like the bytes: a layer's second or two differ by noise, which 30 layers
    # multiply (SmolVLM-256M at a 2x2 grid: 10.6 s predicted that way, 21.8 s measured)
    rate = sum(p["flops"] for p in points) / max(1e-9, sum(p["seconds"] for p in points))
    return Plan(stage=stage, kind=kind, fixed=sum(categories.values()) - per_sample, per_sample=per_sample,
                gradients=max(0.0, _summed(points, "gradient_bytes", vision, text)),
                update=max(0.0, _summed(points, "update_bytes", vision, text)),
                flops_per_sample=flops, seconds_per_sample=flops / rate if rate > 0 else 0.0,
                categories=categories, traced=points, **extra)


def _traced(run) -> tuple[dict, float, float]:
    """``run(tracker)`` under a fresh memory tracker and the FLOP counter: (bytes by category at the peak, FLOPs,
    seconds)."""
    from torch.utils.flop_counter import FlopCounterMode

    tracker = torch_private.step_memory_tracker()
    counter = FlopCounterMode(display=False)
    start = time.perf_counter()
    with tracker, counter:
        run(tracker)
    return torch_private.peak_by_category(tracker), float(counter.get_total_flops()), time.perf_counter() - start


def _training_point(module, settings, section, model_dir: Path, row: dict, vision: int, text: int, seed: int,
                    scratch: Path, timed: bool = False, resident: bool = False) -> dict:
    """One traced optimizer step of the stage's trainer on the model shortened to ``vision``/``text`` layers.
    ``resident``: also the kernel's count of the step (see measure_training)."""
    import torch
    from datasets import Dataset
    from transformers import AutoProcessor


    model = _shortened(model_dir, vision, text, seed)
    training.freeze_components(model, section.components)
    data = Dataset.from_list(module.plan_rows([row] * max(8, 2 * section.batch_size)))  # a whole micro-batch
    trainer = module.make_trainer(settings, model, AutoProcessor.from_pretrained(model_dir), data, scratch / "out")
    loader = iter(trainer.get_train_dataloader())
    next(loader)  # the first batch pays the loader's start
    collating = time.perf_counter()
    batch = next(loader)  # the processor's work on a micro-batch: image splitting, tokens (host time on any device)
    collate_seconds = time.perf_counter() - collating
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before a step
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    for p in trained:  # the optimizer's state exists from the first step on: make it before the traced step
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)

    def forward_backward(tracker) -> None:
        tracker.track_external(trainer.model, trainer.optimizer,
                               *[v for v in batch.values() if isinstance(v, torch.Tensor)])
        trainer.training_step(trainer.model, batch)

    def update(tracker) -> None:  # its own peak: the gradients all made, the activations all gone
        tracker.track_external(trainer.model, trainer.optimizer)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    counted = None
    if resident:
        # an untraced step first: what the first step initialises once (kernels, thread pools, autograd's workers)
        # is the process's, not the step's
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        _LIBC.malloc_trim(0)  # what is free now goes back now, not during the step
        Path("/proc/self/clear_refs").write_text("5")  # the kernel's high-water mark (VmHWM) restarts from here
        resident_before = _status_bytes("VmRSS")
    memory, flops, seconds = _traced(forward_backward)
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in trained if p.grad is not None)
    updated, _, update_seconds = _traced(update)
    if resident:  # the tensors the step started with, counted, and what the kernel saw the step add
        counted = _tensor_bytes(trainer.model, trainer.optimizer, batch) \
            + _status_bytes("VmHWM") - resident_before
    if timed:  # the trackers' bookkeeping out of the time: one plain step
        start = time.perf_counter()
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        seconds, update_seconds = time.perf_counter() - start, 0.0
    per = section.batch_size
    return {"vision": vision, "text": text,
            "bytes": {k: v / per if k in BATCH_CATEGORIES else v for k, v in memory.items()},
            "flops": flops / per, "seconds": (seconds + update_seconds) / per, "gradient_bytes": gradients,
            "update_bytes": updated["Total"], "update": updated, "tokens": int(batch["input_ids"].shape[1]),
            "collate_seconds": collate_seconds / per, "timed": timed, "resident": counted}


def _tensor_bytes(model, optimizer, batch: dict) -> int:
    """Bytes of the distinct storages of a model's parameters and buffers, its optimizer's state and a batch."""
    import torch

    tensors = [*model.parameters(), *model.buffers(), *(v for v in batch.values() if isinstance(v, torch.Tensor)),
               *(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _glibc_counts_every_byte() -> None:
    """glibc from here on (for the rest of the process): every allocation above 128 KiB its own mapping, returned
    when freed (no dynamic threshold, no arena cache: resident memory follows the live tensors), every byte it
    allocates written (M_PERTURB: Linux backs a page only once it is written, and a step allocates memory it never
    writes all of, which a GPU allocator holds all the same)."""
    m_trim_threshold, m_mmap_threshold, m_perturb = -1, -3, -6  # malloc.h
    for option, value in ((m_trim_threshold, 128 << 10), (m_mmap_threshold, 128 << 10), (m_perturb, 0xA5)):
        _LIBC.mallopt(option, value)


def _status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS: resident now; VmHWM: its peak since the last reset), in bytes."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def trace_training(stage: str, section, model_dir: Path, rows: list[dict], seed: int = 0,
                   precision: str = "fp32", gradient_checkpointing: bool = False, rows_from: str = "",
                   timed: bool = False) -> Plan:
    """The plan of one optimizer step of training stage ``stage`` (its module's trainer) with ``section`` (its
    config section: LoRA, frozen components, the loss) on ``rows`` (canonical rows; the longest is traced)."""



    module = importlib.import_module(f"stages.{stage}")
    row = max(rows, key=lambda r: len(r["question"]) + len(r["answer"]))
    row = dict(row, image=pil(row["image"]))
    traced = section.model_copy(update={
        "batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": 2, "save_steps": 2, "warmup_steps": 0,
        "precision": "fp32", "gradient_checkpointing": gradient_checkpointing})
    if stage == "grpo":  # one prompt's group of completions; a sample is a completion, as GRPO's batch_size counts
        traced = traced.model_copy(update={"batch_size": section.num_generations})
    with tempfile.TemporaryDirectory(prefix="vlmlab-plan-") as scratch:
        settings = TrainSettings(stage=traced, prefix=stage, seed=seed, resources=ResourcesConfig(),
                                 model_dir=str(model_dir), tasks={}, trust_remote_code=False, stage_dir=scratch,
                                 mlflow_uri="", mlflow_run_id="")
        points = [_training_point(module, settings, traced, model_dir, row, vision, text, seed, Path(scratch), timed)
                  for vision, text in TRACE_DEPTHS]
    return _plan(stage, "train", points, model_dir, precision=precision, gradient_checkpointing=gradient_checkpointing,
                 rows=rows_from, tokens=points[0]["tokens"], collate_seconds=points[0]["collate_seconds"],
                 timed=timed)


def _generation_point(model_dir: Path, row: dict, max_new_tokens: int, vision: int, text: int, seed: int,
                      timed: bool = False) -> dict:
    """One traced greedy generation with the model shortened to ``vision``/``text`` layers."""

    import torch
    from transformers import AutoProcessor


    model = _shortened(model_dir, vision, text, seed).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    prompt = processor.apply_chat_template(user_turn(row["question"]), add_generation_prompt=True)
    image = pil(row["image"])
    collating = time.perf_counter()
    batch = processor(text=[prompt], images=[[image]], return_tensors="pt", padding=True)
    collate_seconds = time.perf_counter() - collating

    def generate(tracker) -> None:
        tracker.track_external(model, *[v for v in batch.values() if isinstance(v, torch.Tensor)])
        with torch.inference_mode():  # every answer at its full length: the worst case's cache
            model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)

    memory, flops, seconds = _traced(generate)
    if timed:  # the trackers' bookkeeping out of the time
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
    return {"vision": vision, "text": text, "bytes": memory, "flops": flops, "seconds": seconds,
            "gradient_bytes": 0.0, "update_bytes": 0.0, "tokens": int(batch["input_ids"].shape[1]), "timed": timed,
            "collate_seconds": collate_seconds}


def trace_generation(stage: str, model_dir: Path, rows: list[dict], max_new_tokens: int, seed: int = 0,
                     precision: str = "fp32", rows_from: str = "", timed: bool = False) -> Plan:
    """The plan of greedy generation (eval, DPO's on-policy answers): one prompt, the answer's full length."""
    row = max(rows, key=lambda r: len(r["question"]))
    points = [_generation_point(model_dir, row, max_new_tokens, vision, text, seed, timed)
              for vision, text in TRACE_DEPTHS]
    return _plan(stage, "generate", points, model_dir, precision=precision, rows=rows_from,
                 tokens=points[0]["tokens"] + max_new_tokens, new_tokens=max_new_tokens, timed=timed,
                 collate_seconds=points[0]["collate_seconds"])


def measure_training(stage: str, section, model_dir: Path, rows: list[dict], batch: int, seed: int = 0,
                     precision: str = "fp32", gradient_checkpointing: bool = False, timed: bool = False,
                     resident: bool = False) -> dict:
    """The same step at full depth and micro-batch ``batch`` with real tensors: what a plan is checked against
    (bytes by category at the peak, FLOPs, seconds). Needs the memory it measures.

    ``resident`` (Linux): also an independent count of the peak, ``resident`` bytes: the tensors the step starts with
    (the model's, the optimizer state, the batch: their storages' sizes) plus what the process's resident memory
    grew by during the step (the kernel's high-water mark, after an untraced step). Linux backs a page only once it is
    written, and a step allocates memory it never writes all of (the tiny default's sft: 13.6 MB a sample allocated,
    by the tracker and by torch's profiler alike, 7.0 MB resident), so glibc is told to write every byte it allocates,
    for the rest of the process (``_glibc_counts_every_byte``): measure in a process of its own."""
    module = importlib.import_module(f"stages.{stage}")
    row = max(rows, key=lambda r: len(r["question"]) + len(r["answer"]))
    row = dict(row, image=pil(row["image"]))
    section = section.model_copy(update={
        "batch_size": batch, "gradient_accumulation_steps": 1, "max_steps": 2, "save_steps": 2, "warmup_steps": 0,
        "precision": "fp32", "gradient_checkpointing": gradient_checkpointing})
    vision, text = _depths(model_dir)
    if resident:  # before the model exists: its memory too is allocated as the step's is
        _glibc_counts_every_byte()
    with tempfile.TemporaryDirectory(prefix="vlmlab-measure-") as scratch:
        settings = TrainSettings(stage=section, prefix=stage, seed=seed, resources=ResourcesConfig(),
                                 model_dir=str(model_dir), tasks={}, trust_remote_code=False, stage_dir=scratch,
                                 mlflow_uri="", mlflow_run_id="")
        point = _training_point(module, settings, section, model_dir, row, vision, text, seed, Path(scratch), timed,
                                resident)
    per = section.batch_size  # the point is per sample: back to the whole micro-batch
    point["bytes"] = {k: v * per if k in BATCH_CATEGORIES else v for k, v in point["bytes"].items()}
    point["bytes"]["Total"] = sum(v for k, v in point["bytes"].items() if k != "Total")
    return point | {"flops": point["flops"] * per, "seconds": point["seconds"] * per, "batch": batch,
                    "peak": max(point["bytes"]["Total"], point["update_bytes"])}
