"""Stage `data`: produce each task's train/test splits in canonical form, with a fingerprint.

Synthetic tasks are generated (seeded) and saved in their real layouts first (VQAv2 / ChartQA columns, parquet
with embedded images), then read back through the same loader real datasets use.
"""
from __future__ import annotations

from pathlib import Path

from harness.manifest import fingerprint_files
from stages import StageContext, StageOutput
from stages.support import datasets as dsets
from stages.support import synthetic

SYNTHETIC_TEST_OFFSET = 10_000_000  # test rows never share an index (hence a seed) with train rows


CONFIG_KEYS = ("seed", "data")
SOURCE_KEYS = ("data.vqa.source", "data.chartqa.source")  # local directories: keyed by content


def check(cfg) -> None:
    """Nothing beyond the config model's own validation (paths exist, sizes positive)."""


def _write_parquet(rows: list[dict], path: Path, features=None) -> None:
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows, features=features).to_parquet(str(path))


def _synthetic_source(kind: str, spec, cfg, raw_dir: Path) -> None:
    from datasets import Dataset, Image

    name = dsets.SYNTHETIC_TASK[kind]
    sizes = {"train": spec.train_size or 8000, "test": spec.test_size or 300}
    offsets = {"train": 0, "test": SYNTHETIC_TEST_OFFSET}
    for split, size in sizes.items():
        rows = synthetic.generate(name, size, cfg.seed, cfg.data.image_size, offsets[split])
        ds = Dataset.from_list(rows).cast_column("image", Image())
        (raw_dir / name).mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(raw_dir / name / f"{split}.parquet"))


def run(ctx: StageContext) -> StageOutput:
    from rich.progress import Progress

    cfg = ctx.cfg
    tasks = {k: spec for k, spec in (("vqa", cfg.data.vqa), ("chartqa", cfg.data.chartqa)) if spec is not None}
    outputs: dict = {"tasks": {}}
    metrics: dict[str, float] = {}
    with Progress(transient=True) as progress:
        bar = progress.add_task("data", total=2 * len(tasks))
        for kind, spec in tasks.items():
            if spec.source == "synthetic":
                raw_dir = ctx.stage_dir / "raw"
                progress.update(bar, description=f"generating {dsets.SYNTHETIC_TASK[kind]}")
                _synthetic_source(kind, spec, cfg, raw_dir)
                spec = spec.model_copy(update={"source": str(raw_dir / dsets.SYNTHETIC_TASK[kind]),
                                               "format": "parquet"})
            files = []
            for split_key in ("train", "test"):
                split = getattr(spec, f"{split_key}_split")
                limit = getattr(spec, f"{split_key}_size")
                progress.update(bar, description=f"{kind}: loading {split}")
                rows, origin = dsets.load_split(spec, kind, split, limit)
                canonical = dsets.canonicalize(rows, kind, spec.columns, origin, limit)
                path = ctx.stage_dir / kind / f"{split_key}.parquet"
                _write_parquet(canonical, path, dsets.canonical_features())
                files.append(path)
                metrics[f"data/{kind}_{split_key}_size"] = len(canonical)
                progress.advance(bar)
            outputs["tasks"][kind] = {"train": str(files[0]), "test": str(files[1]),
                                      "fingerprint": fingerprint_files(files)}
    outputs["data_fingerprints"] = {k: v["fingerprint"] for k, v in outputs["tasks"].items()}
    return StageOutput(metrics=metrics, outputs=outputs)
