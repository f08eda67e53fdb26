"""One eval-throughput measurement (run by benchmarks/run_all.py, one process each so neither warms the other).

    eval_speed.py vlmlab       MODEL_DIR TASKS_JSON   # the eval stage's model: batched generation
    eval_speed.py lm-eval-bs1  MODEL_DIR TASKS_JSON   # lm-eval's stock hf-multimodal at batch size 1
    eval_speed.py tokens       MODEL_DIR TASKS_JSON   # mean tokens per SFT sample (for tokens/s)

Prints one JSON line. Only `simple_evaluate` is timed (model loading is not, for either).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def evaluate(which: str, model_dir: str, tasks: dict) -> dict:
    import lm_eval
    import torch
    from lm_eval.models.hf_vlms import HFMultimodalLM
    from lm_eval.tasks import TaskManager

    from evals.lm_model import TimedHFMultimodalLM
    from evals.registry import TASKS
    from runtime.config import load_config
    from stages.eval import write_task_configs

    torch.set_num_threads(2)
    cfg = load_config(None, [])
    task_dir = Path(tempfile.mkdtemp(prefix="vlmlab-evalspeed-"))
    write_task_configs(tasks, task_dir, cfg.eval.protocol, cfg.eval.max_new_tokens)
    names = {k: TASKS[k].lm_eval_name(cfg.eval.protocol) for k in tasks}
    cls, batch = (TimedHFMultimodalLM, cfg.eval.batch_size) if which == "vlmlab" else (HFMultimodalLM, 1)
    lm = cls(pretrained=model_dir, dtype="float32", max_images=1, convert_img_format=True, device="cpu",
             batch_size=batch)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=list(names.values()),
                                      task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                      apply_chat_template=True, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, fewshot_random_seed=0)
    seconds = time.perf_counter() - start
    items = sum(results["n-samples"][names[k]]["effective"] for k in tasks)
    scores = {k: round(results["results"][names[k]][f"{TASKS[k].metric},none"], 6) for k in tasks}
    return {"items": items, "seconds": seconds, "items_per_second": items / seconds, "batch_size": batch,
            "scores": scores}


def tokens(model_dir: str, tasks: dict) -> dict:
    import pyarrow.parquet as pq
    from transformers import AutoProcessor

    from stages.support.training import assistant_turn, user_turn

    processor = AutoProcessor.from_pretrained(model_dir)
    counts = []
    for files in tasks.values():
        rows = pq.read_table(files["train"], columns=["image", "question", "answer"]).slice(0, 128).to_pylist()
        for row in rows:
            from io import BytesIO

            from PIL import Image

            text = processor.apply_chat_template(user_turn(row["question"]) + assistant_turn(row["answer"]))
            image = Image.open(BytesIO(row["image"]["bytes"])).convert("RGB")
            counts.append(len(processor(text=text, images=[image])["input_ids"][0]))
    return {"tokens_per_sample": sum(counts) / len(counts), "samples": len(counts)}


if __name__ == "__main__":
    which, model_dir, tasks = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    print(json.dumps(tokens(model_dir, tasks) if which == "tokens" else evaluate(which, model_dir, tasks)))
