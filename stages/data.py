"""Stage `data`: produce each task's train/test splits in canonical form, with a fingerprint and an overlap check.

Synthetic tasks are generated (seeded) and saved in their real layouts first (VQAv2 / ChartQA columns, parquet
with embedded images), then read back through the same loader real datasets use. Every test item is hashed (image
bytes + normalised question) against the training split: a test item seen in training scores the memory, not the
model, so any overlap stops the run unless `data.tasks.<task>.allow_overlap` is set.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from evals.registry import TASKS
from runtime.errors import DataError
from runtime.manifest import fingerprint_files
from stages import StageContext, StageOutput
from stages.support import datasets as dsets
from stages.support import synthetic

SYNTHETIC_TEST_OFFSET = 10_000_000  # test rows never share an index (hence a seed) with train rows
SYNTHETIC_SIZES = {"train": 8000, "test": 300}


CONFIG_KEYS = ("seed", "data")
SOURCE_KEYS = ("data.tasks.*.source", "data.tasks.*.train_from.source")  # local directories: keyed by content


def check(cfg) -> None:
    """Nothing beyond the config model's own validation (tasks known, paths exist, sizes positive)."""


def write_parquet(rows: list[dict], path: Path, features=None) -> None:
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows, features=features).to_parquet(str(path))


def item_key(row: dict) -> str:
    """What makes two items the same: the image's bytes and the question, case and spacing aside."""
    question = re.sub(r"\s+", " ", row["question"]).strip().lower()
    return hashlib.sha256(row["image"]["bytes"] + b"\0" + question.encode()).hexdigest()


def synthetic_source(task: str, spec, seed: int, image_size: int, raw_dir: Path) -> Path:
    """The task's generator output as parquet files in its real layout (``raw_dir/<generator>/{train,test}``).
    Test rows whose item also occurs in the generated train rows are skipped (small images repeat by chance)."""
    from datasets import Dataset, Image

    name = TASKS[task].generator
    train_size, test_size = spec.train_size or SYNTHETIC_SIZES["train"], spec.test_size or SYNTHETIC_SIZES["test"]
    train = synthetic.generate(name, train_size, seed, image_size)
    seen = {item_key(r) for r in dsets.canonicalize(train, task, {}, name, None)}
    test, offset = [], SYNTHETIC_TEST_OFFSET
    while len(test) < test_size:
        batch = synthetic.generate(name, test_size - len(test), seed, image_size, offset)
        offset += len(batch)
        canonical = dsets.canonicalize(batch, task, {}, name, None)
        test += [row for row, c in zip(batch, canonical, strict=True) if item_key(c) not in seen]
    out = raw_dir / name
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        Dataset.from_list(rows).cast_column("image", Image()).to_parquet(str(out / f"{split}.parquet"))
    return out


def generated(spec, raw: Path):
    """A synthetic task's spec as the loader reads the generator's output (``raw``): the generator makes both
    splits, so the keys that describe a hub or local source (format, hub_config, revision, train_from, the split
    names: a hub preset's, with only `source` overridden) do not apply."""
    return spec.model_copy(update={"source": str(raw), "format": "parquet", "hub_config": None, "revision": None,
                                   "train_from": None, "train_split": "train", "test_split": "test"})


def task_splits(task: str, spec, seed: int, image_size: int, raw_dir: Path) -> dict[str, list[dict]]:
    """A task's train and test rows in canonical form, from its generator or its source."""
    if spec.source == "synthetic":
        spec = generated(spec, synthetic_source(task, spec, seed, image_size, raw_dir))
    splits = {}
    for split_key in ("train", "test"):
        limit = getattr(spec, f"{split_key}_size")
        rows, origin, layout = dsets.load_split(spec, split_key, limit)
        splits[split_key] = dsets.canonicalize(rows, task, spec.columns, origin, limit, layout)
    return splits


def check_overlap(task: str, spec, splits: dict[str, list[dict]]) -> int:
    """How many test items also occur in the training split; a DataError if any do and that is not allowed."""
    seen = {item_key(r) for r in splits["train"]}
    shared = sum(item_key(r) in seen for r in splits["test"])
    if shared and not spec.allow_overlap:
        raise DataError(f"data.tasks.{task}: {shared} of {len(splits['test'])} test items also occur in the training "
                        "split (same image and question), so its scores would measure memory; use disjoint splits, "
                        f"or set data.tasks.{task}.allow_overlap=true to score it anyway")
    return shared


def run(ctx: StageContext) -> StageOutput:
    from rich.progress import Progress

    cfg = ctx.cfg
    data_seed = cfg.seed if cfg.data.seed is None else cfg.data.seed
    outputs: dict = {"tasks": {}, "sources": {}}
    metrics: dict[str, float] = {}
    with Progress(transient=True) as progress:
        bar = progress.add_task("data", total=2 * len(cfg.data.tasks))
        for task, spec in cfg.data.tasks.items():
            outputs["sources"][task] = source_record(task, spec)
            progress.update(bar, description=f"{task}: loading")
            splits = task_splits(task, spec, data_seed, cfg.data.image_size, ctx.stage_dir / "raw")
            progress.advance(bar, 2)
            for split_key, rows in splits.items():
                metrics[f"data/{task}_{split_key}_size"] = len(rows)
            metrics[f"data/{task}_overlap"] = check_overlap(task, spec, splits)
            files = []
            for split_key, rows in splits.items():
                path = ctx.stage_dir / task / f"{split_key}.parquet"
                write_parquet(rows, path, dsets.canonical_features())
                files.append(path)
            outputs["tasks"][task] = {"train": str(files[0]), "test": str(files[1]),
                                      "fingerprint": fingerprint_files(files)}
    outputs["data_fingerprints"] = {k: v["fingerprint"] for k, v in outputs["tasks"].items()}
    return StageOutput(metrics=metrics, outputs=outputs)


def source_record(task: str, spec) -> dict:
    """Where a task's splits came from, with the hub commit each resolved to (the manifest's data pins)."""
    record = {}
    train = spec if spec.source == "synthetic" else spec.train_from or spec  # the generator makes both splits
    for role, src in (("test", spec), ("train", train)):
        if src.source == "synthetic":
            record[role] = {"source": "synthetic", "generator": TASKS[task].generator}
        elif dsets.looks_local(src.source):
            record[role] = {"source": "local"}  # a path may hold a secret; its content is in the fingerprint
        else:
            record[role] = {"source": src.source, "config": src.hub_config,
                            "revision": dsets.hub_revision(src.source, src.hub_config, src.revision)}
    return record
