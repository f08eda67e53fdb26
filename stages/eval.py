"""Stage `eval`: score every checkpoint of the pipeline through lm-eval, plus a question-only prior.

Checkpoints scored: the base model (metrics ``eval/base_*``), every earlier training stage's model
(``eval/<stage>_*``) and, under the plain names ``eval/*``, the pipeline's final model. VQA accuracy follows
VQAv2, chart accuracy ChartQA's relaxed accuracy; per-question-type accuracies come from lm-eval's samples.
Scoring runs on Ray workers, `resources.workers` shards per checkpoint; the driver merges the items' scores.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import yaml

from evals.metrics import question_prior, relaxed_accuracy, vqa_accuracy
from stages import StageContext, StageOutput

TASK_DIR = Path(__file__).resolve().parent.parent / "evals" / "tasks"
TASKS = {  # data task -> (lm-eval task, metric key in lm-eval results, vlmlab metric name)
    "vqa": ("vlmlab_vqa", "vqa_accuracy", "vqa_accuracy"),
    "chartqa": ("vlmlab_chartqa", "relaxed_accuracy", "chartqa_relaxed_accuracy"),
}
SCORERS = {"vqa": vqa_accuracy, "chartqa": relaxed_accuracy}


CONFIG_KEYS = ("seed", "eval", "resources")
DATA_FILES = ("evals/tasks",)  # loaded by path (lm-eval task YAMLs, their utils.py): in the code fingerprint


def check(cfg) -> None:
    """Validated by the config model (EvalConfig)."""


def write_task_configs(tasks: dict, out_dir: Path, max_new_tokens: int) -> None:
    """Task YAMLs for one scoring process: include vlmlab's task definitions (from this process's own copy of
    the project, wherever Ray unpacked it), point them at this run's test parquet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, files in tasks.items():
        task, _, _ = TASKS[kind]
        spec = {"include": str(TASK_DIR / f"{task}.yaml"), "task": task,
                "dataset_kwargs": {"data_files": {"test": str(Path(files["test"]).resolve())}},
                "generation_kwargs": {"until": ["<end_of_utterance>", "\n"], "do_sample": False,
                                      "max_gen_toks": max_new_tokens}}
        (out_dir / f"{task}.yaml").write_text(yaml.safe_dump(spec))


def checkpoints(ctx: StageContext) -> list[tuple[str, str]]:
    """(label, model_dir) in pipeline order; the last one is the pipeline's result."""
    found = [(name, out.outputs["model_dir"]) for name, out in ctx.inputs.items() if "model_dir" in out.outputs]
    found = [("base" if name == "model" else name, path) for name, path in found]
    if not ctx.cfg.eval.score_base and len(found) > 1:
        found = found[1:]
    return found


def prior_scores(tasks: dict, limit: int | None) -> dict[str, float]:
    """Question-only baseline: each question answered with its most frequent training answer."""
    import pyarrow.parquet as pq

    out = {}
    for kind, files in tasks.items():
        train = pq.read_table(files["train"], columns=["question", "answer"])
        test = pq.read_table(files["test"], columns=["question", "answers"]).to_pylist()[:limit]
        prior = question_prior(train["question"].to_pylist(), train["answer"].to_pylist())
        score = SCORERS[kind]
        out[f"eval/prior_{TASKS[kind][2]}"] = sum(score(prior.get(r["question"], ""), r["answers"])
                                                  for r in test) / len(test)
    return out


def score_shard(job: dict, device: str) -> dict:
    """On a Ray worker: lm-eval over every task's items with one checkpoint, generating only this shard's batches.

    Returns the items this shard generated (question, answers, type, prediction, score) and its busy seconds.
    """
    import tempfile

    import lm_eval
    from lm_eval.tasks import TaskManager

    from evals.lm_model import TimedHFMultimodalLM

    lm = TimedHFMultimodalLM(pretrained=job["model_dir"], dtype="float32" if device == "cpu" else "auto",
                             max_images=1, convert_img_format=True, device=device, batch_size=job["batch_size"],
                             trust_remote_code=job["trust_remote_code"], shard=job["shard"],
                             num_shards=job["num_shards"])
    kinds = [k for k in TASKS if k in job["tasks"]]
    with tempfile.TemporaryDirectory() as task_dir:
        write_task_configs(job["tasks"], Path(task_dir), job["max_new_tokens"])
        seed = job["seed"]
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[TASKS[k][0] for k in kinds],
            task_manager=TaskManager(include_path=task_dir, include_defaults=False), limit=job["limit"],
            apply_chat_template=True, log_samples=True, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
    items = []
    for kind in kinds:
        task, key, _ = TASKS[kind]
        for s in results["samples"][task]:
            if (task, s["doc_id"]) in lm.owned:
                doc = s["doc"]
                items.append({"task": kind, "doc_id": s["doc_id"], "question": doc["question"],
                              "answers": list(doc["answers"]), "question_type": doc["question_type"],
                              "prediction": s["filtered_resps"][0], "score": float(s[key])})
    return {"items": items, "busy_seconds": lm.busy_seconds}


def task_metrics(items: list[dict], kinds: list[str]) -> dict[str, float]:
    """Each task's metric (mean item score, in item order) and its per-question-type means."""
    metrics: dict[str, float] = {}
    for kind in kinds:
        scored = sorted((i for i in items if i["task"] == kind), key=lambda i: i["doc_id"])
        name = TASKS[kind][2]
        metrics[name] = sum(i["score"] for i in scored) / len(scored)
        by_type: dict[str, list[float]] = defaultdict(list)
        for i in scored:
            by_type[i["question_type"]].append(i["score"])
        for qtype, values in sorted(by_type.items()):
            metrics[f"{name}/{qtype}"] = sum(values) / len(values)
    return metrics


def write_predictions(items: list[dict], path: Path, key: str) -> None:
    with open(path, "w") as f:
        for i in sorted(items, key=lambda i: i["doc_id"]):
            f.write(json.dumps({"question": i["question"], "answers": i["answers"], "prediction": i["prediction"],
                                key: i["score"]}) + "\n")


def run(ctx: StageContext) -> StageOutput:
    """Shards every checkpoint's scoring over `resources.workers` Ray tasks; the driver only merges and averages."""
    from harness import raytrain
    from harness.cost import gpu_alias

    cfg = ctx.cfg
    tasks = ctx.latest("tasks")
    kinds = [k for k in TASKS if k in tasks]
    metrics = prior_scores(tasks, cfg.eval.limit)
    targets = checkpoints(ctx)
    n = cfg.resources.workers
    jobs = [{"label": label, "model_dir": model_dir, "tasks": tasks, "shard": k, "num_shards": n,
             "batch_size": cfg.eval.batch_size, "max_new_tokens": cfg.eval.max_new_tokens, "limit": cfg.eval.limit,
             "seed": cfg.seed, "trust_remote_code": cfg.model.trust_remote_code}
            for label, model_dir in targets for k in range(n)]
    raytrain.ensure_ray(cfg.ray.dashboard)
    with ctx.meter.hold(raytrain.devices_held(cfg.resources), "CPU"):
        done = raytrain.run_shards(score_shard, jobs, cfg.resources, "eval")
    ctx.meter.kind = gpu_alias(done[0]["device"])  # what the workers actually ran on
    ctx.meter.add_busy(sum(d["result"]["busy_seconds"] for d in done))
    shards = []
    for i, (label, _) in enumerate(targets):
        mine = [(job, d) for job, d in zip(jobs, done, strict=True) if job["label"] == label]
        items = [item for _, d in mine for item in d["result"]["items"]]
        scores = task_metrics(items, kinds)
        for kind in kinds:
            task, key, _ = TASKS[kind]
            write_predictions([it for it in items if it["task"] == kind],
                              ctx.stage_dir / f"predictions_{label}_{kind}.jsonl", key)
        prefix = "eval/" if i == len(targets) - 1 else f"eval/{label}_"
        metrics.update({f"{prefix}{k}": v for k, v in scores.items()})
        main = [scores[TASKS[k][2]] for k in kinds]
        metrics[f"{prefix}mean_accuracy"] = sum(main) / len(main)
        shards += [{"checkpoint": label, "shard": job["shard"], "node_id": d["node_id"], "device": d["device"],
                    "items": len(d["result"]["items"]), "seconds": round(d["seconds"], 3)} for job, d in mine]
    return StageOutput(metrics=metrics, outputs={"scored": [label for label, _ in targets], "shards": shards},
                       ran_on={"shards": [{"node_id": d["node_id"], "device": d["device"], "hardware": d["hardware"]}
                                          for d in done]})
