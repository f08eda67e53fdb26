"""The baseline for the harness-overhead benchmark: a bare TRL SFT script, no Ray, no MLflow, no stage cache.

It does what `harness run train pipelines.train=[data,model,sft]` does, the way a user would write it by hand:
generate the same synthetic data, build the same tiny model, train with TRL's SFTTrainer on the same rows,
arguments (same steps, batch, LR schedule, checkpoint interval) and threads, then save the model.

    .venv/bin/python benchmarks/bare_sft.py --out /tmp/bare [key=value overrides, as for harness]

Prints one JSON line: wall seconds, the Unix time the first optimizer step began, busy seconds, steps.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_data(cfg, out: Path) -> dict:
    """Each task's canonical train/test parquet, generated and read back exactly as the data stage does."""
    from stages.data import synthetic_source, write_parquet
    from stages.support import datasets as dsets

    tasks = {}
    for kind, spec in cfg.data.tasks.items():
        raw = synthetic_source(kind, spec, cfg.seed, cfg.data.image_size, out / "raw")
        spec = spec.model_copy(update={"source": str(raw), "format": "parquet"})
        tasks[kind] = {}
        for split_key in ("train", "test"):
            limit = getattr(spec, f"{split_key}_size")
            rows, origin, layout = dsets.load_split(spec, split_key, limit)
            path = out / kind / f"{split_key}.parquet"
            canonical = dsets.canonicalize(rows, kind, spec.columns, origin, limit, layout)
            write_parquet(canonical, path, dsets.canonical_features())
            tasks[kind][split_key] = str(path)
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    start = time.time()
    import pyarrow.parquet as pq
    import torch
    from trl import SFTConfig, SFTTrainer

    from runtime.config import load_config
    from stages.sft import to_prompt_completion
    from stages.support import callbacks, tinyvlm, training
    from stages.support.settings import TrainSettings

    cfg = load_config(None, args.overrides)
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    tasks = make_data(cfg, args.out / "data")
    texts = []
    for files in tasks.values():
        table = pq.read_table(files["train"], columns=["question", "answer"])
        texts += [f"{q} {a}" for q, a in zip(table["question"].to_pylist(), table["answer"].to_pylist(), strict=True)]
    model_dir = tinyvlm.build(texts, cfg.model.tiny, cfg.data.image_size, cfg.seed, args.out / "model")
    model, processor = training.load_model(str(model_dir), False)
    data = training.load_tasks(tasks, "train", cfg.seed)
    data = data.map(to_prompt_completion, remove_columns=["question", "answers", "answer", "question_type"])
    settings = TrainSettings(stage=cfg.sft, prefix="sft", seed=cfg.seed, resources=cfg.resources,
                             model_dir=str(model_dir), tasks=tasks, trust_remote_code=False, stage_dir=str(args.out),
                             mlflow_uri="", mlflow_run_id="")
    sft_args = SFTConfig(**training.common_args(settings, args.out / "trainer"), max_length=None,
                         completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=data, processing_class=processor)
    timer = callbacks.StepTimer()
    trainer.add_callback(timer)
    out = trainer.train()
    trainer.save_model(str(args.out / "final"))
    print(json.dumps({"wall_seconds": time.time() - start, "started_at": start, "first_step_unix": timer.first_step_at,
                      "busy_seconds": timer.busy, "steps": out.global_step, "train_loss": out.training_loss,
                      "train_samples_per_second": out.metrics.get("train_samples_per_second")}))


if __name__ == "__main__":
    main()
