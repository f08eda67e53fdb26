"""`resources.fit: auto`: each device stage's micro-batch chosen to fit the worker's device, before any work.

From the memory plan (stages/support/memory.py) of each device stage of the pipeline, traced on the run's model (a
shell of it: config, processor, tokenizer; built here for `tiny` and `random`) and rows like the run's (its tasks'
synthetic generators at its image size: a stand-in for hub data, said in the record):

* a training stage gets the largest micro-batch ``b`` <= its ``batch_size`` that divides its effective batch
  (``batch_size x gradient_accumulation_steps``, kept: the accumulation becomes ``effective / b``; GRPO: ``b`` a
  multiple of ``num_generations``) whose predicted peak fits; gradient checkpointing only when no batch fits without
  it;
* eval gets the largest ``eval.batch_size`` <= the configured one whose generation fits (DPO's on-policy answers
  are generated at that batch too, so both must fit).

A stage that cannot fit at batch 1 stops the run before any work, with the device, the predicted GB and what would
fit. The choice is written into the config the run uses (so it is part of every stage's cache key, recorded in
config.yaml, result.json, each stage.json, MLflow and the manifest) and `harness reproduce` reruns it as chosen.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evals.registry import TASKS
from runtime.architectures import architecture
from runtime.errors import ConfigError, UserError
from stages import STAGES, TRAINING
from stages.support import datasets as dsets
from stages.support import memory, smolvlm, synthetic, tinyvlm

GIB = 2 ** 30
RESERVE_GIB = 0.6  # outside torch's allocator on a GPU: the CUDA context and its kernels (~0.3-0.6 GiB by card)
SLACK = 0.92  # of the rest: the caching allocator's fragmentation
STANDIN_ROWS = 16  # rows per task from its synthetic generator
# what the fit may suggest: device -> its memory (GiB), the cards harness/estimate.py prices
DEVICE_GIB = {"T4": 16, "L4": 24, "A10G": 24, "A100 (80 GB)": 80, "H100": 80, "H200": 141}


def usable_bytes(device_gib: float) -> float:
    return max(0.0, (device_gib - RESERVE_GIB) * GIB * SLACK)


@dataclass
class Choice:
    stage: str
    batch_size: int
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    predicted_gib: float = 0.0
    configured: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)

    def changed(self) -> bool:
        now = {"batch_size": self.batch_size, "gradient_accumulation_steps": self.gradient_accumulation_steps,
               "gradient_checkpointing": self.gradient_checkpointing}
        return any(self.configured.get(k, v) != v for k, v in now.items())


def precision_of(section, use_gpu: bool) -> str:
    """The precision a stage trains in: as configured; `auto` is half precision on a GPU (bf16 or fp16), fp32 else."""
    if section.precision != "auto":
        return section.precision
    return "fp16" if use_gpu else "fp32"


def standin_rows(cfg) -> list[dict]:
    """Canonical rows (image, question, answer) of the configured tasks' synthetic generators at the run's image size:
    the run's own rows for synthetic tasks, a stand-in for hub data."""
    rows = []
    for task in cfg.data.tasks:
        name = TASKS[task].generator
        generated = synthetic.generate(name, STANDIN_ROWS, cfg.seed, cfg.data.image_size)
        rows += [dict(r, task=task) for r in dsets.canonicalize(generated, task, {}, name, None)]
    return rows


def model_shell(cfg, rows: list[dict], dest: Path) -> Path | None:
    """A directory with the run's model config, processor and tokenizer (weights where they come cheap): what the
    plan builds shortened models from. None where that needs the model stage (a hub id not in the local cache,
    `compose`)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a shell is scaffolding: no "Writing model shards" bar
    texts = [f"{r['question']} {r['answer']}" for r in rows] * 8
    source = cfg.model.source
    if source == "tiny":
        return tinyvlm.build(texts, cfg.model.tiny, cfg.data.image_size, cfg.seed, dest)
    if source == "random":
        return smolvlm.save_shell(architecture(cfg.model.architecture), texts, dest, cfg.model.image_longest_edge)
    if source == "compose":
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=cfg.model.revision, local_files_only=True))
    except Exception:  # not in the local cache: nothing to read before the model stage fetches it
        return None


def max_new_tokens(cfg) -> int:
    """The longest answer eval generates over the run's tasks: eval.max_new_tokens (short), or each task's own
    lm-eval setting (lmms)."""
    if cfg.eval.protocol == "short":
        return cfg.eval.max_new_tokens

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    lengths = [yaml.load(TASKS[t].task_file(cfg.eval.protocol).read_text(), Loader=Loader)
               .get("generation_kwargs", {}).get("max_gen_toks", cfg.eval.max_new_tokens) for t in cfg.data.tasks]
    return max(lengths)


def training_choice(stage: str, section, plans: dict[bool, memory.Plan], budget: float) -> Choice | None:
    """The largest micro-batch that fits ``budget`` bytes (without gradient checkpointing if any does)."""
    effective = section.batch_size * section.gradient_accumulation_steps
    step = section.num_generations if stage == "grpo" else 1
    candidates = [b for b in range(section.batch_size, 0, -1) if effective % b == 0 and b % step == 0]
    configured = {"batch_size": section.batch_size, "gradient_accumulation_steps": section.gradient_accumulation_steps,
                  "gradient_checkpointing": section.gradient_checkpointing}
    for checkpointing in (False, True):
        plan = plans.get(checkpointing)
        if plan is None:
            continue
        for b in candidates:
            if plan.peak(b, effective // b) <= budget:
                return Choice(stage, b, effective // b, checkpointing or section.gradient_checkpointing,
                              plan.peak(b, effective // b) / GIB, configured, summary(plan))
    return None


def summary(plan: memory.Plan) -> dict:
    """What a record keeps of a plan: the GiB it predicts, how it was traced."""
    return {"fixed_gib": plan.fixed / GIB, "per_sample_gib": plan.per_sample / GIB,
            "update_gib": plan.update / GIB, "gradients_gib": plan.gradients / GIB,
            "flops_per_sample": plan.flops_per_sample, "precision": plan.precision,
            "gradient_checkpointing": plan.gradient_checkpointing, "rows": plan.rows, "tokens": plan.tokens}


def plans_for(cfg, stages: list[str], shell: Path, rows: list[dict], checkpointing: bool = False,
              rows_from: str = "", timed: bool = False) -> dict[str, memory.Plan]:
    """The memory plan of each device stage of ``stages`` (DPO's on-policy generation as ``dpo-generate``)."""
    use_gpu = cfg.resources.use_gpu
    out = {}
    for name in stages:
        if name in TRAINING:
            section = _section(cfg, name)
            out[name] = memory.trace_training(name, section, shell, rows, cfg.seed, precision_of(section, use_gpu),
                                              checkpointing or section.gradient_checkpointing, rows_from, timed)
            if name == "dpo" and cfg.dpo.preference.source == "tasks" and cfg.dpo.preference.rejected == "on_policy":
                out["dpo-generate"] = memory.trace_generation("dpo", shell, rows, cfg.eval.max_new_tokens, cfg.seed,
                                                              "fp16" if use_gpu else "fp32", rows_from, timed)
        elif name == "eval":
            out[name] = memory.trace_generation("eval", shell, rows, max_new_tokens(cfg), cfg.seed,
                                                "fp16" if use_gpu else "fp32", rows_from, timed)
    return out


def _section(cfg, name: str):
    """The section a training stage trains with (align's forces its frozen towers: its module's ``section``)."""
    module = STAGES[name]
    return module.section(cfg) if hasattr(module, "section") else getattr(cfg, name)


def would_fit(cfg, name: str, plan: memory.Plan, shell: Path, rows: list[dict], rows_from: str) -> list[str]:
    """What would fit where stage ``name`` does not at batch 1: LoRA (traced), a smaller tile grid, larger devices."""
    options = []
    section = _section(cfg, name) if name in TRAINING else None
    if section is not None and not section.lora.enabled:
        lora = section.model_copy(update={"lora": section.lora.model_copy(update={"enabled": True})})
        precision = precision_of(section, cfg.resources.use_gpu)
        with_lora = memory.trace_training(name, lora, shell, rows, cfg.seed, precision, True, rows_from)
        options.append(f"{name}.lora.enabled=true (~{with_lora.peak(1) / GIB:.1f} GB with gradient checkpointing)")
    if cfg.model.source == "random":
        arch = architecture(cfg.model.architecture)
        edge = cfg.model.image_longest_edge or arch.longest_edge
        if edge > arch.tile:
            options.append(f"a smaller tile grid (model.image_longest_edge={edge - arch.tile})")
    elif cfg.data.image_size > 16:
        options.append(f"smaller images (data.image_size={cfg.data.image_size // 2})")
    larger = [d for d, gib in DEVICE_GIB.items() if usable_bytes(gib) >= plan.peak(1)]
    options.append(f"a larger device ({', '.join(larger)})" if larger else "more memory than any single device here "
                   "(shard the model)")
    return options


def fit_to_device(cfg, stages: list[str], device_gib: float, device: str, say=print) -> tuple[object, dict]:
    """``cfg`` with each device stage of ``stages`` fitted to a device of ``device_gib`` GiB, and the record of the
    choices. Raises UserError, before any work, when a stage fits at no batch."""
    budget = usable_bytes(device_gib)
    with tempfile.TemporaryDirectory(prefix="vlmlab-fit-") as tmp:
        rows = standin_rows(cfg)
        synthetic_only = all(spec.source == "synthetic" for spec in cfg.data.tasks.values())
        rows_from = "the run's synthetic rows" if synthetic_only else "synthetic stand-in rows (the tasks' hub data " \
            "is read later, by the data stage)"
        shell = model_shell(cfg, rows, Path(tmp) / "model")
        if shell is None:
            say(f"warning: resources.fit: the model of model.source={cfg.model.source} is only known after the model "
                "stage; the run keeps its configured batch sizes (resources.fit=off silences this)")
            return cfg, {}
        plans = plans_for(cfg, stages, shell, rows, rows_from=rows_from)
        updates: dict[str, dict] = {}
        record: dict = {"device": device, "device_gib": device_gib, "usable_gib": budget / GIB, "stages": {}}
        for name in [s for s in stages if s in TRAINING]:
            section = getattr(cfg, name)
            choice = training_choice(name, section, {False: plans[name]}, budget)
            if choice is None:  # only gradient checkpointing could: trace it
                checkpointed = plans_for(cfg, [name], shell, rows, True, rows_from)[name]
                choice = training_choice(name, section, {True: checkpointed}, budget)
            if choice is None:
                raise UserError(
                    f"resources.fit: stage {name} does not fit the {device} ({device_gib:g} GiB, {budget / GIB:.1f} "
                    f"usable) even at batch 1: predicted {plans[name].peak(1) / GIB:.1f} GB ({plans[name].precision}, "
                    f"LoRA {'on' if section.lora.enabled else 'off'}); would fit: "
                    + "; ".join(would_fit(cfg, name, plans[name], shell, rows, rows_from)))
            updates[name] = {"batch_size": choice.batch_size,
                             "gradient_accumulation_steps": choice.gradient_accumulation_steps,
                             "gradient_checkpointing": choice.gradient_checkpointing}
            record["stages"][name] = vars(choice)
        generation = [plans[k] for k in ("eval", "dpo-generate") if k in plans]
        if generation:
            worst = max(generation, key=lambda p: p.peak(1))
            batch = next((b for b in range(cfg.eval.batch_size, 0, -1)
                          if all(p.peak(b) <= budget for p in generation)), None)
            if batch is None:
                raise UserError(
                    f"resources.fit: {worst.stage}'s generation does not fit the {device} ({device_gib:g} GiB) even at "
                    f"batch 1: predicted {worst.peak(1) / GIB:.1f} GB; would fit: "
                    + "; ".join(would_fit(cfg, "eval", worst, shell, rows, rows_from)))
            updates["eval"] = {"batch_size": batch}
            record["stages"]["eval"] = vars(Choice("eval", batch, predicted_gib=max(p.peak(batch) for p in generation)
                                                   / GIB, configured={"batch_size": cfg.eval.batch_size},
                                                   plan=summary(worst)))
    fitted = cfg.model_copy(update={name: getattr(cfg, name).model_copy(update=values)
                                    for name, values in updates.items()})
    for name, choice in record["stages"].items():
        was = choice["configured"]
        now = {k: v for k, v in updates[name].items() if was.get(k) != v}
        if now:
            say(f"resources.fit: {name} {', '.join(f'{k} {was[k]} -> {v}' for k, v in now.items())} "
                f"(predicted {choice['predicted_gib']:.1f} GB of the {device}'s {record['usable_gib']:.1f} usable)")
    return fitted, record


def check_device_memory(cfg) -> tuple[float, str] | None:
    """(GiB, name) of the device a stage's worker gets, where the fit applies: resources.device_memory_gb, or the
    GPU torch sees here; None where the fit does not apply (fit off, a CPU run without device_memory_gb)."""
    res = cfg.resources
    if res.fit == "off":
        return None
    if res.device_memory_gb is not None:
        return res.device_memory_gb, "declared device" if not res.use_gpu else "GPU (resources.device_memory_gb)"
    if not res.use_gpu:
        return None
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / GIB, props.name
    raise ConfigError("resources.fit: the GPU's memory cannot be read here (no CUDA device in this process: a Ray "
                      "cluster's head?); set resources.device_memory_gb=<GiB of one worker's GPU>, or "
                      "resources.fit=off")
