"""Stage `eval`: score every checkpoint of the pipeline through lm-eval, plus a question-only prior.

Checkpoints scored: the base model (metrics ``eval/base_*``), every earlier training stage's model
(``eval/<stage>_*``) and, under the plain names ``eval/*``, the pipeline's final model. VQA accuracy follows
VQAv2, chart accuracy ChartQA's relaxed accuracy; per-question-type accuracies come from lm-eval's samples.
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


def check(cfg) -> None:
    """Validated by the config model (EvalConfig)."""


def write_task_configs(tasks: dict, out_dir: Path, max_new_tokens: int) -> None:
    """Per-run task YAMLs: include vlmlab's task definitions, point them at this run's test parquet."""
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


def lm_eval_scores(model_dir: str, ctx: StageContext, task_dir: Path, label: str) -> dict[str, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evals.lm_model import TimedHFMultimodalLM

    cfg = ctx.cfg
    device = "cuda" if cfg.resources.use_gpu else "cpu"
    lm = TimedHFMultimodalLM(pretrained=model_dir, dtype="float32" if device == "cpu" else "auto", max_images=1,
                             convert_img_format=True, device=device, batch_size=cfg.eval.batch_size,
                             trust_remote_code=cfg.model.trust_remote_code)
    kinds = [k for k in TASKS if k in ctx.latest("tasks")]
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[TASKS[k][0] for k in kinds],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        limit=cfg.eval.limit, apply_chat_template=True, log_samples=True,
        random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
    )
    ctx.meter.add_busy(lm.busy_seconds)
    metrics: dict[str, float] = {}
    for kind in kinds:
        task, key, name = TASKS[kind]
        metrics[name] = float(results["results"][task][f"{key},none"])
        by_type: dict[str, list[float]] = defaultdict(list)
        with open(ctx.stage_dir / f"predictions_{label}_{kind}.jsonl", "w") as f:
            for s in results["samples"][task]:
                by_type[s["doc"]["question_type"]].append(float(s[key]))
                f.write(json.dumps({"question": s["doc"]["question"], "answers": list(s["doc"]["answers"]),
                                    "prediction": s["filtered_resps"][0], key: s[key]}) + "\n")
        for qtype, values in sorted(by_type.items()):
            metrics[f"{name}/{qtype}"] = sum(values) / len(values)
    return metrics


def run(ctx: StageContext) -> StageOutput:
    from harness import raytrain
    from harness.cost import device_kind

    cfg = ctx.cfg
    tasks = ctx.latest("tasks")
    task_dir = ctx.stage_dir / "tasks"
    write_task_configs(tasks, task_dir, cfg.eval.max_new_tokens)
    metrics = prior_scores(tasks, cfg.eval.limit)
    targets = checkpoints(ctx)
    devices = raytrain.devices_held(cfg.resources) / cfg.resources.workers  # eval holds one worker's devices
    with ctx.meter.hold(devices, device_kind(cfg.resources.use_gpu)):
        for i, (label, model_dir) in enumerate(targets):
            scores = lm_eval_scores(model_dir, ctx, task_dir, label)
            prefix = "eval/" if i == len(targets) - 1 else f"eval/{label}_"
            metrics.update({f"{prefix}{k}": v for k, v in scores.items()})
            main = [scores[TASKS[k][2]] for k in TASKS if TASKS[k][2] in scores]
            metrics[f"{prefix}mean_accuracy"] = sum(main) / len(main)
    return StageOutput(metrics=metrics, outputs={"scored": [label for label, _ in targets]})
