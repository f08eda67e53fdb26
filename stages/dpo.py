"""Stage `dpo`: direct preference optimisation with TRL's DPOTrainer, as a Ray Train job.

Pairs come from the task data (chosen: the right answer; rejected: another answer of the same question type, or
the checkpoint's own wrong generation) or from a preference dataset in the RLAIF-V layout. With LoRA the
adapter-disabled base is the reference model; without it TRL keeps a frozen copy.
"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from evals.metrics import normalize_vqa_answer
from runtime import raytrain
from runtime.errors import ConfigError, DataError
from stages import StageContext, StageOutput, StepCost
from stages.support import datasets as dsets
from stages.support import launch, training
from stages.support.generate import generate_answers, shard_batches

PREFERENCE_COLUMNS = ("question", "chosen", "rejected", "image")


CONFIG_KEYS = ("seed", "dpo", "resources", "eval.batch_size", "eval.max_new_tokens")
SOURCE_KEYS = ("dpo.preference.source",)


def step_cost(section) -> StepCost:
    """A pair: chosen and rejected, each trained (3 forwards' work) and scored by the reference model (1)."""
    return StepCost(passes=2 * (3 + 1))


def generated_items(cfg, train_rows: int) -> int:
    """Answers generated before training: the checkpoint's own answers to the pairs' questions (on-policy)."""
    pref = cfg.dpo.preference
    if pref.source != "tasks" or pref.rejected != "on_policy":
        return 0
    return min(pref.size or train_rows, train_rows) if train_rows else (pref.size or 0)


def check(cfg) -> None:
    launch.check_grades(cfg, "dpo")
    pref = cfg.dpo.preference
    if pref.source == "tasks" or not Path(pref.source).expanduser().exists():
        return
    with dsets.quiet():
        read_pairs(pref, 1)  # columns, the image column's type and the first row, as the stage reads them


def _load_preference_source(pref, limit: int | None = None):
    """The preference split, through the same loader the task data uses (hub id, save_to_disk, parquet)."""
    return dsets.load_rows(pref.source, pref.format, pref.split, limit)[0]


def _sentence(answer: str, style: str) -> str:
    return f"The answer is {answer}." if style == "sentence" else answer


def accepted_answers(answer: str, answers: list[str]) -> set[str]:
    """Answers that score full VQA accuracy (given by >= 3 annotators), plus the target, normalised."""
    counts = Counter(normalize_vqa_answer(a) for a in answers)
    return {a for a, n in counts.items() if n >= min(3, len(answers))} | {normalize_vqa_answer(answer)}


def training_rows(tasks: dict, size: int | None) -> list[dict]:
    """The training rows pairs are built from: ``size`` in all, split evenly over the tasks."""
    import pyarrow.parquet as pq

    per_task = -(-size // len(tasks)) if size else None
    rows = []
    for task, files in tasks.items():
        table = pq.read_table(files["train"]).to_pylist()[:per_task]
        rows += [dict(r, task=task) for r in table]
    return rows[:size] if size else rows


def pairs_from_tasks(tasks: dict, pref, seed: int, wrong_answers: dict[int, str] | None = None) -> list[dict]:
    """Chosen = the training answer; rejected = the model's own wrong answer (on-policy) or another answer of
    the same task and question type."""
    rows = training_rows(tasks, pref.size)
    pools: dict[tuple, list[str]] = {}
    for r in rows:
        pools.setdefault((r["task"], r["question_type"]), []).append(r["answer"])
    rng = random.Random(seed)
    pairs = []
    for i, r in enumerate(rows):
        truth = accepted_answers(r["answer"], r["answers"])
        rejected = (wrong_answers or {}).get(i)
        if rejected is None or normalize_vqa_answer(rejected) in truth:
            pool = set(pools[(r["task"], r["question_type"])])
            candidates = [a for a in pool if normalize_vqa_answer(a) not in truth]
            if not candidates:
                continue
            rejected = rng.choice(sorted(candidates))
        pairs.append({"image": r["image"], "question": r["question"],
                      "chosen": _sentence(r["answer"], pref.chosen_style),
                      "rejected": _sentence(rejected, pref.chosen_style)})
    return pairs


def pairs_from_source(pref) -> list[dict]:
    """A preference dataset in the RLAIF-V layout, every row checked."""
    return read_pairs(pref, pref.size)


def read_pairs(pref, limit: int | None) -> list[dict]:
    """The first ``limit`` rows (all where None) of a preference dataset, checked: the columns, the image column's
    type, then each row's text and image (raises DataError naming the row)."""
    ds = _load_preference_source(pref, limit)
    mapping = {name: pref.columns.get(name, name) for name in PREFERENCE_COLUMNS}
    for name, col in mapping.items():
        if col not in ds.column_names:
            raise ConfigError(f"dpo.preference.source: {pref.source} has no column '{col}' (needed for '{name}'; "
                              f"columns present: {', '.join(sorted(ds.column_names))}); remap it with "
                              f"dpo.preference.columns.{name}")
    ds = dsets.image_column(ds, mapping["image"], pref.source, "dpo.preference.columns.image")
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise DataError(f"{pref.source}: preference split '{pref.split}' is empty; add rows or set "
                        "dpo.preference.split")
    out = []
    for i in range(n):
        row = ds[i]
        where = f"{pref.source} row {i}"
        for name in ("question", "chosen", "rejected"):
            if not isinstance(row[mapping[name]], str) or not row[mapping[name]].strip():
                raise DataError(f"{where}: '{mapping[name]}' must hold non-empty text (got "
                                f"{dsets.short_repr(row[mapping[name]])}); fix or drop that row")
        out.append({"image": dsets.image_bytes(row[mapping["image"]], where), "question": row[mapping["question"]],
                    "chosen": row[mapping["chosen"]], "rejected": row[mapping["rejected"]]})
    return out


def generate_shard(job: dict, device: str) -> list[str]:
    """On a Ray worker: greedy answers for this shard's rows (whole batches of the training rows)."""

    rows = training_rows(job["tasks"], job["size"])
    picked = [rows[i] for i in job["indices"]]
    return generate_answers(job["model_dir"], [r["question"] for r in picked], [r["image"] for r in picked],
                            batch_size=job["batch_size"], max_new_tokens=job["max_new_tokens"], device=device,
                            trust_remote_code=job["trust_remote_code"])


def on_policy_wrong_answers(ctx: StageContext, tasks: dict, size: int | None) -> tuple[dict[int, str], list[dict]]:
    """Greedy generations of the incoming checkpoint on the training questions (row index -> answer), sharded over
    `resources.workers` Ray tasks; also returns where each shard ran."""

    cfg = ctx.cfg
    n_rows = len(training_rows(tasks, size))
    jobs = [{"tasks": tasks, "size": size, "indices": indices, "model_dir": ctx.latest("model_dir"),
             "batch_size": cfg.eval.batch_size, "max_new_tokens": cfg.eval.max_new_tokens,
             "trust_remote_code": cfg.model.trust_remote_code}
            for indices in shard_batches(n_rows, cfg.eval.batch_size, cfg.resources.workers) if indices]
    done = raytrain.run_held(generate_shard, jobs, cfg, ctx.meter, "dpo-generate")
    answers = {i: a for job, d in zip(jobs, done, strict=True) for i, a in zip(job["indices"], d["result"],
                                                                               strict=True)}
    shards = [{"node_id": d["node_id"], "device": d["device"], "items": len(job["indices"]),
               "hardware": d["hardware"]} for job, d in zip(jobs, done, strict=True)]
    return answers, shards


def to_preference(row: dict) -> dict:
    return {"prompt": training.user_turn(row["question"]), "chosen": training.assistant_turn(row["chosen"]),
            "rejected": training.assistant_turn(row["rejected"])}


def summarize(history: list[dict]) -> dict[str, float]:
    """Reward margin over the first and last 10% of logged steps, and the final reward accuracy."""
    logs = [h for h in history if "rewards/margins" in h]
    if not logs:
        return {}
    start, end = training.start_end([h["rewards/margins"] for h in logs])
    return {"dpo/reward_margin_start": start, "dpo/reward_margin_end": end,
            "dpo/reward_accuracy": training.start_end([h["rewards/accuracies"] for h in logs])[1]}


def loss_args(stage) -> dict:
    """TRL loss settings: the preference loss, plus the SFT loss on chosen answers when sft_weight > 0."""
    if stage.sft_weight > 0:
        return {"loss_type": [stage.loss_type, "sft"], "loss_weights": [1.0, stage.sft_weight]}
    return {"loss_type": [stage.loss_type]}


def plan_rows(rows: list[dict]) -> list[dict]:
    """Canonical rows as this stage's trainer reads pairs (the memory plan's step): the row's answer chosen, the
    longest other answer rejected (a padded pair costs its longer side)."""
    longest = max((r["answer"] for r in rows), key=len)
    return [{"image": r["image"], **to_preference({"question": r["question"], "chosen": r["answer"],
                                                   "rejected": longest})} for r in rows]


def make_trainer(settings, model, processor, data, output_dir):
    """The stage's TRL trainer: what the Ray workers train with, and what the memory plan traces a step of. With
    LoRA the reference is the adapter-disabled model; without, TRL keeps a frozen copy."""
    from trl import DPOConfig, DPOTrainer

    stage = settings.stage
    args = DPOConfig(**training.common_args(settings, output_dir), max_length=None, beta=stage.beta,
                     **loss_args(stage))
    return DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data, processing_class=processor,
                      peft_config=training.peft_config(stage.lora))


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    from datasets import load_dataset

    settings = config["settings"]
    scratch, model, processor, _ = training.start_worker(settings)
    data = load_dataset("parquet", data_files=settings.inputs["pairs"], split="train").shuffle(seed=settings.seed)
    data = data.map(to_preference, remove_columns=["question", "chosen", "rejected"])
    trainer = make_trainer(settings, model, processor, data, scratch)
    training.train_and_save(trainer, processor, settings, scratch, summarize=summarize)


def run(ctx: StageContext) -> StageOutput:
    from datasets import Dataset, Features, Image, Value

    pref = ctx.cfg.dpo.preference
    wrong, shards = None, []
    if pref.source == "tasks":
        tasks = ctx.latest("tasks")
        if pref.rejected == "on_policy":
            wrong, shards = on_policy_wrong_answers(ctx, tasks, pref.size)
        pairs = pairs_from_tasks(tasks, pref, ctx.cfg.seed, wrong)
    else:
        pairs = pairs_from_source(pref)
    if not pairs:
        raise DataError("dpo: no preference pairs could be built (no wrong answers to reject?)")
    path = ctx.stage_dir / "pairs.parquet"
    features = Features({"image": Image(), "question": Value("string"), "chosen": Value("string"),
                         "rejected": Value("string")})
    Dataset.from_list(pairs, features=features).to_parquet(str(path))
    out = launch.run_stage(ctx, train_loop, ctx.cfg.dpo, inputs={"pairs": str(path.resolve())})
    out.metrics["dpo/pairs"] = float(len(pairs))
    if shards:
        out.outputs["generation_shards"] = [{k: v for k, v in s.items() if k != "hardware"} for s in shards]
        out.ran_on["shards"] = shards
    return out
