"""Stage `eval`: score every checkpoint of the pipeline through lm-eval, plus a question-only prior.

Checkpoints scored: the base model (metrics ``eval/base_*``), every earlier training stage's model
(``eval/<stage>_*``) and, under the plain names ``eval/*``, the pipeline's final model. Each task's prompts,
generation and post-processing follow ``eval.protocol`` (its lm-eval YAML, ``evals/tasks/<task>/<protocol>.yaml``);
per-question-type scores come from lm-eval's samples, and every metric gets a seeded bootstrap 95 % interval
(``<metric>_ci_low`` / ``_ci_high``). Scoring runs on Ray workers, `resources.workers` shards per checkpoint; the
driver merges the items' scores.
"""
from __future__ import annotations

import functools
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evals import hooks
from evals.item_cache import model_digest
from evals.metrics import bootstrap_metric, interval, question_prior
from evals.registry import TASKS
from runtime import raytrain
from runtime.atomic import atomic_write
from runtime.config import TRAINING_STAGES
from runtime.cost import gpu_alias
from runtime.errors import UserError
from runtime.manifest import fingerprint_files
from runtime.output import active_stage
from runtime.records import read_checkpoint_score, scored_checkpoint
from stages import StageContext, StageOutput

CONFIG_KEYS = ("seed", "eval", "resources")
DATA_FILES = ("evals/tasks",)  # loaded by path (lm-eval task YAMLs, their utils.py): in the code fingerprint


def check(cfg) -> None:
    """Validated by the config model (EvalConfig; every task has the protocol)."""


def write_task_configs(tasks: dict, out_dir: Path, protocol: str, max_new_tokens: int) -> None:
    """Task YAMLs for one scoring process: include vlmlab's task definitions (from this process's own copy of
    the project, wherever Ray unpacked it), point them at this run's test parquet. The short protocol's answer
    length is eval.max_new_tokens; a published protocol keeps its own generation settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, files in tasks.items():
        entry = TASKS[task]
        spec = {"include": str(entry.task_file(protocol)), "task": entry.lm_eval_name(protocol),
                "dataset_kwargs": {"data_files": {"test": str(Path(files["test"]).resolve())}}}
        if protocol == "short":
            spec["generation_kwargs"] = {"until": ["<end_of_utterance>", "\n"], "do_sample": False,
                                         "max_gen_toks": max_new_tokens}
        (out_dir / f"{entry.lm_eval_name(protocol)}.yaml").write_text(yaml.safe_dump(spec))


def task_files(task_names: list[str], protocol: str) -> dict[str, str]:
    """Each task's protocol file (``<task>/<protocol>.yaml``) -> one sha256 over it, the template it includes and its
    hooks (recorded beside the scores)."""
    return {f"{k}/{protocol}.yaml": fingerprint_files(TASKS[k].files(protocol)) for k in task_names}


def checkpoints(cfg, inputs: dict[str, StageOutput]) -> list[tuple[str, str]]:
    """(label, model_dir) of the models the stages so far made, in pipeline order; in the eval stage's inputs the
    last one is the pipeline's result."""
    found = [(name, out.outputs["model_dir"]) for name, out in inputs.items() if "model_dir" in out.outputs]
    found = [("base" if name == "model" else name, path) for name, path in found]
    if not cfg.eval.score_base and len(found) > 1:
        found = found[1:]
    return found


def shard_jobs(cfg, tasks: dict, targets: list[tuple[str, str]], item_cache) -> list[dict]:
    """score_shard's jobs: ``resources.workers`` shards of each target's scoring."""
    protocol, n = cfg.eval.protocol, cfg.resources.workers
    files = task_files([k for k in TASKS if k in tasks], protocol)
    digests = {model_dir: model_digest(Path(model_dir)) for _, model_dir in targets} if item_cache else {}
    return [{"label": label, "model_dir": model_dir, "tasks": tasks, "shard": k, "num_shards": n,
             "protocol": protocol, "batch_size": cfg.eval.batch_size, "max_new_tokens": cfg.eval.max_new_tokens,
             "limit": cfg.eval.limit, "seed": cfg.seed, "trust_remote_code": cfg.model.trust_remote_code,
             "reasoning_tags": cfg.eval.reasoning_tags, "task_files": files, "item_cache": item_cache,
             "model_digest": digests.get(model_dir)}
            for label, model_dir in targets for k in range(n)]


@dataclass
class Early:
    """A model's scoring started while training stage ``during`` trains (``score_while_training``)."""
    label: str
    model_dir: str
    during: str
    jobs: list[dict]
    refs: list  # Ray ObjectRefs of the jobs' shards, in order
    began: float = field(default_factory=time.time)
    training_ended: float | None = None  # time.time() when ``during`` finished (the runner sets it)
    done: list[dict] = field(default_factory=list)  # what the shards returned (raytrain.submit_shards)

    def record(self) -> dict:
        """When the scoring ran, in seconds from the training stage's start (when it began)."""
        ended = max(d["ended"] for d in self.done)
        return {"checkpoint": self.label, "during": self.during, "began_s": 0.0,
                "ended_s": round(ended - self.began, 3),
                "training_ended_s": round(self.training_ended - self.began, 3) if self.training_ended else None}


def score_while_training(cfg, inputs: dict[str, StageOutput], during: str, item_cache,
                         scoring: set[str]) -> list[Early]:
    """Start scoring, on Ray workers beyond stage ``during``'s training ranks, every model the stages so far made that
    no one is scoring yet (``scoring``: model dirs). The eval stage later takes their results (``Early``) as its
    own: the same jobs, so the same scores. Starts nothing where the cluster has no room for them (``auto``), inside a
    sweep's trial (its resources are the trial's) or with ``off``; ``on`` without room is a UserError."""
    mode = cfg.eval.while_training
    targets = [(label, d) for label, d in checkpoints(cfg, inputs) if d not in scoring]
    if mode == "off" or not targets or raytrain.in_tune_trial():
        return []
    raytrain.ensure_ray(cfg.ray.dashboard)  # as the training stage starts it
    spare = raytrain.spare_workers(cfg.resources, busy_workers=cfg.resources.workers)
    if spare < cfg.resources.workers:
        if mode == "on":
            raise UserError(f"eval.while_training=on: while {during} trains on {cfg.resources.workers} worker(s), "
                            f"the cluster has room for {spare} more of the eval's {cfg.resources.workers}; "
                            "add a node, or set eval.while_training=auto (scores after training where there is no "
                            "room)")
        return []
    tasks = next(out.outputs["tasks"] for out in reversed(list(inputs.values())) if "tasks" in out.outputs)
    started = []
    for label, model_dir in targets[:spare // cfg.resources.workers]:  # the rest after training: no room now
        jobs = shard_jobs(cfg, tasks, [(label, model_dir)], item_cache)
        refs = raytrain.submit_shards(score_shard, jobs, cfg.resources, f"eval-{label}")
        started.append(Early(label, model_dir, during, jobs, refs))
    return started


def checkpoint_settings(job: dict) -> dict:
    """What a checkpoint's scores depend on besides its weights: a shard job, less which model, which shard of how
    many (the batches are the same however many shards share them) and where answers are kept."""
    skip = {"label", "model_dir", "shard", "num_shards", "item_cache", "model_digest", "checkpoint", "tasks"}
    return {k: v for k, v in job.items() if k not in skip} | {"tasks": sorted(job["tasks"])}


def checkpoint_scorer(cfg, stage: str, tasks: dict, start_dir: str, stage_dir: Path):
    """Ray Train's ValidationConfig for eval.checkpoints=all (runtime.raytrain.fit): each checkpoint training stage
    ``stage`` reports before its end is scored by ``score_checkpoint`` in a Ray task of its own (no resources: it
    waits on its shards, which hold the workers) while training goes on."""
    from ray.train import ValidationConfig
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    jobs = shard_jobs(cfg, tasks, [(stage, start_dir)], None)  # no item cache: each checkpoint is scored once
    live = active_stage()
    logs = [live.worker_log(f"checkpoints.shard{k}", label=f"eval-{stage}") if live else None
            for k in range(len(jobs))]
    fn = functools.partial(score_checkpoint, stage=stage, jobs=jobs, resources=cfg.resources, logs=logs,
                           out_dir=str((stage_dir / "checkpoint_scores").resolve()),
                           samples=cfg.eval.bootstrap_samples, seed=cfg.seed)
    # outside the training workers' placement group (the shards too: runtime.raytrain.submit_shards)
    return ValidationConfig(fn=fn, ray_remote_kwargs={
        "num_cpus": 0, "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None)})


def score_checkpoint(checkpoint, *, step: int, stage: str, jobs: list[dict], resources, logs: list, out_dir: str,
                     samples: int, seed: int) -> dict:
    """Ray Train's validation function (eval.checkpoints=all), in a Ray task while ``stage`` trains: the checkpoint
    it reported at ``step``, scored by the eval's shard jobs (the same shards, batches and scores as the eval stage
    gives a model), on workers of the training ranks' shape. Its items, metrics and shards' times go to
    ``out_dir/step-<step>.json``, which the stage reads when training ends; Ray keeps the mean accuracy with the
    checkpoint."""
    import ray

    label, began = f"{stage}-step{step}", time.time()
    jobs = [job | {"label": label, "checkpoint": checkpoint} for job in jobs]
    done = ray.get(raytrain.submit_shards(score_shard, jobs, resources, f"eval-{label}", logs=logs))
    items = [item for d in done for item in d["result"]["items"]]
    metrics = main_metrics(items, [k for k in TASKS if k in jobs[0]["tasks"]], samples, seed)
    record = {"stage": stage, "step": step, "settings": checkpoint_settings(jobs[0]), "began": began,
              "ended": time.time(), "metrics": metrics, "items": items,
              "shards": [{"node_id": d["node_id"], "device": d["device"], "began": d["began"], "ended": d["ended"],
                          "phases": d["phases"], "items": len(d["result"]["items"]),
                          "generated": d["result"]["generated"]} for d in done]}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(out_dir) / f"step-{step:07d}.json", json.dumps(record))
    return {"eval/mean_accuracy": metrics["mean_accuracy"]}


def bill_scored_checkpoints(stage: str, stage_dir: Path, meter, devices: float, trained_at: float, released: float,
                            expected: list[int], say) -> list[dict]:
    """After training stage ``stage``'s fit (eval.checkpoints=all): the checkpoints scored while it trained, billed to
    its meter, one line on the console, and a warning for the ``expected`` steps without scores (their scoring failed:
    Ray Train logs why). Returns each as {file, step, began_s, ended_s, training_ended_s} (seconds from the start of
    the stage's hold; training_ended_s: when its last optimizer step ended).

    Billing: a shard's time before ``released`` (rank 0 handed in the final model) ran on devices beyond the ranks'
    and adds a hold of its own; after it, the stage's hold (kept until fit returns) already covers the shard, whose
    work fills that tail (otherwise idle): on one machine the freed devices are the ones it scores on. Files of an
    earlier, interrupted attempt (scored before this hold) join the curve but are not billed again."""
    found = []
    for path in sorted((stage_dir / "checkpoint_scores").glob("step-*.json")):
        try:
            record = read_checkpoint_score(path)
        except UserError as exc:
            say(f"warning: {exc}")
            continue
        shards, share = record["shards"], devices / len(record["shards"])
        if record["began"] >= meter.hold_began:
            for shard in shards:
                meter.add_hold(shard["began"], min(shard["ended"], released), share, gpu_alias(shard["device"]))
                meter.add_worker(shard["began"], shard["phases"], share, hold_began=shard["began"])
        found.append({"file": str(path.resolve()), "step": record["step"],
                      "mean_accuracy": record["metrics"]["mean_accuracy"],
                      "began_s": round(record["began"] - meter.hold_began, 3),
                      "ended_s": round(record["ended"] - meter.hold_began, 3),
                      "training_ended_s": round(trained_at - meter.hold_began, 3)})
    if found:
        curve = ", ".join(f"step {f['step']}: {f['mean_accuracy']:.3f}" for f in found)
        say(f"{stage}: scored {len(found)} checkpoint(s) while training (mean accuracy {curve})")
    missing = sorted(set(expected) - {f["step"] for f in found})
    if missing:
        say(f"warning: {stage}'s checkpoint(s) of step(s) {', '.join(map(str, missing))} were not scored (their "
            f"scoring failed: its shards log to the run's logs/ray/eval-{stage}.checkpoints.shard*.log); the eval "
            "reports the others")
    return found


def prior_scores(tasks: dict, limit: int | None, samples: int, seed: int) -> dict[str, float]:
    """Question-only baseline: each question answered with its most frequent training answer."""
    import pyarrow.parquet as pq

    out = {}
    for task, files in tasks.items():
        entry = TASKS[task]
        train = pq.read_table(files["train"], columns=["question", "answer"])
        test = pq.read_table(files["test"], columns=["question", "answers", "subset"]).to_pylist()[:limit]
        prior = question_prior(train["question"].to_pylist(), train["answer"].to_pylist())
        items = [{"task": task, "doc_id": i, "score": entry.score(prior.get(r["question"], ""), r["answers"]),
                  "subset": r["subset"]} for i, r in enumerate(test)]
        scores = main_metrics(items, [task], samples, seed)
        out |= {f"eval/prior_{k}": v for k, v in scores.items() if not k.startswith("mean_accuracy")}
    return out


def score_shard(job: dict, device: str) -> dict:
    """On a Ray worker: lm-eval over every task's items with one checkpoint, generating only this shard's batches.

    Returns the items this shard answered (question, answers, type, subset, prediction, score), how many of them it
    generated and how many it read from the item cache; its seconds of start and generation go to the stage's
    held-time split (runtime.raytrain.add_phase). A job with a ``checkpoint`` (a training checkpoint Ray Train
    reported; ``model_dir`` is then the model its stage started from) scores that checkpoint, made whole here.
    """
    import tempfile

    if job.get("checkpoint") is None:
        return _score(job, device, job["model_dir"])
    with tempfile.TemporaryDirectory() as tmp:
        with raytrain.phase("start"):
            model_dir = materialize(job["checkpoint"], job["model_dir"], Path(tmp), job["trust_remote_code"])
        return _score(job, device, model_dir)


def materialize(checkpoint, start_dir: str, dest: Path, trust_remote_code: bool) -> str:
    """A checkpoint a training stage reported (stages/support/callbacks.py CheckpointReporter: the HF checkpoint in
    ``checkpoint/``) as a model directory lm-eval loads: its LoRA adapter, if it has one, merged into the model the
    stage started from (``start_dir``), and that model's processor (training leaves it as it is)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    hf = Path(checkpoint.to_directory(str(dest / "reported"))) / "checkpoint"
    model_dir = hf
    if (hf / "adapter_config.json").exists():
        from peft import PeftModel

        base = AutoModelForImageTextToText.from_pretrained(start_dir, trust_remote_code=trust_remote_code,
                                                           use_safetensors=True)
        model_dir = dest / "merged"
        PeftModel.from_pretrained(base, str(hf)).merge_and_unload().save_pretrained(model_dir, safe_serialization=True)
    AutoProcessor.from_pretrained(start_dir, trust_remote_code=trust_remote_code).save_pretrained(model_dir)
    return str(model_dir)


def _score(job: dict, device: str, model_dir: str) -> dict:
    import tempfile

    with raytrain.phase("start"):  # lm-eval's imports and the model's load
        import lm_eval
        from lm_eval.tasks import TaskManager

        from evals.item_cache import ItemCache, settings_key
        from evals.lm_model import TimedHFMultimodalLM

        dtype = "float32" if device == "cpu" else "auto"
        cache = None
        if job["item_cache"]:  # what the answers depend on, besides each batch's items (evals/item_cache.py)
            key = settings_key({"model": job["model_digest"], "protocol": job["protocol"], "device": device,
                                "dtype": dtype, "task_files": job["task_files"], "seed": job["seed"],
                                "batch_size": job["batch_size"], "max_new_tokens": job["max_new_tokens"]})
            cache = ItemCache(job["item_cache"], key, job["shard"])
        lm = TimedHFMultimodalLM(pretrained=model_dir, dtype=dtype, max_images=1, convert_img_format=True,
                                 device=device, batch_size=job["batch_size"],
                                 trust_remote_code=job["trust_remote_code"], shard=job["shard"],
                                 num_shards=job["num_shards"], item_cache=cache)
    task_names, protocol = [k for k in TASKS if k in job["tasks"]], job["protocol"]
    hooks.use_reasoning_tags(job["reasoning_tags"])  # what the lmms hooks cut (lm-eval passes them no config)
    with tempfile.TemporaryDirectory() as task_dir:
        write_task_configs(job["tasks"], Path(task_dir), protocol, job["max_new_tokens"])
        seed = job["seed"]
        evaluating = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model=lm, tasks=[TASKS[k].lm_eval_name(protocol) for k in task_names],
            task_manager=TaskManager(include_path=task_dir, include_defaults=False), limit=job["limit"],
            apply_chat_template=True, log_samples=True, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
    # before its first batch lm-eval loads the tasks and builds their requests (start); the rest not spent generating
    # (collating batches, filters, metrics) is idle
    raytrain.add_phase("start", (lm.first_generation or time.perf_counter()) - evaluating)
    raytrain.add_phase("generation", lm.busy_seconds)
    items = []
    for task in task_names:
        name = TASKS[task].lm_eval_name(protocol)
        for s in results["samples"][name]:
            if (name, s["doc_id"]) in lm.owned:
                doc = s["doc"]
                items.append({"task": task, "doc_id": s["doc_id"], "question": doc["question"],
                              "answers": list(doc["answers"]), "question_type": doc["question_type"],
                              "subset": doc["subset"], "prediction": s["filtered_resps"][0],
                              "score": float(s[TASKS[task].metric])})
    return {"items": items, "generated": lm.generated, "cached": lm.cached, "cache_key": cache and cache.key,
            "cache_error": cache and cache.unwritable}


def main_metrics(items: list[dict], task_names: list[str], samples: int, seed: int) -> dict[str, float]:
    """Each task's metric with its 95 % interval, and the tasks' mean (``mean_accuracy``) with its interval. A task
    with reporting subsets (ChartQA: human, augmented) scores the mean of the subsets' means, and each subset."""
    out: dict[str, float] = {}
    resampled = []
    for task in task_names:
        scored = sorted((i for i in items if i["task"] == task), key=lambda i: i["doc_id"])
        scores, groups = [i["score"] for i in scored], [i["subset"] for i in scored]
        name = TASKS[task].metric
        boot = bootstrap_metric(scores, groups, samples, seed)
        resampled.append(boot)
        by_subset: dict[str, list[float]] = defaultdict(list)
        for i in scored:
            by_subset[i["subset"]].append(i["score"])
        out[name] = sum(sum(v) / len(v) for v in by_subset.values()) / len(by_subset)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = interval(boot)
        if len(by_subset) > 1:
            out |= {f"{name}_{subset}": sum(v) / len(v) for subset, v in sorted(by_subset.items())}
    out["mean_accuracy"] = sum(out[TASKS[k].metric] for k in task_names) / len(task_names)
    out["mean_accuracy_ci_low"], out["mean_accuracy_ci_high"] = interval(sum(resampled) / len(resampled))
    return out


def task_metrics(items: list[dict], task_names: list[str], samples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Each task's metric (see main_metrics), the tasks' mean, and per-question-type means with intervals."""
    metrics = main_metrics(items, task_names, samples, seed)
    for task in task_names:
        scored = sorted((i for i in items if i["task"] == task), key=lambda i: i["doc_id"])
        by_type: dict[str, list[float]] = defaultdict(list)
        for i in scored:
            by_type[i["question_type"]].append(i["score"])
        for qtype, values in sorted(by_type.items()):
            key = f"{TASKS[task].metric}/{qtype}"
            metrics[key] = sum(values) / len(values)
            metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = interval(bootstrap_metric(values, None, samples,
                                                                                           seed))
    return metrics


def write_predictions(items: list[dict], path: Path, key: str) -> None:
    with open(path, "w") as f:
        for i in sorted(items, key=lambda i: i["doc_id"]):
            f.write(json.dumps({"question": i["question"], "answers": i["answers"], "prediction": i["prediction"],
                                key: i["score"]}) + "\n")


def _finished_early(ctx: StageContext) -> dict[str, Early]:
    """The scorings started while training ran (``ctx.early``), waited for and billed to this stage: each held its
    workers from its start to its last shard's end. One that failed is left to this stage (the answers it kept are
    in the item cache)."""
    import ray

    finished = {}
    for label, e in ctx.early.items():
        try:
            e.done = ray.get(e.refs)
        except Exception as exc:  # a shard's retries spent: scored again below, from what the cache kept
            ctx.say(f"eval: scoring {label} while {e.during} trained failed ({type(exc).__name__}); scoring it now")
            continue
        record = e.record()
        ctx.say(f"eval: {label} was scored while {e.during} trained (in {record['ended_s']:.0f} s; "
                f"{e.during} took {record['training_ended_s'] or 0:.0f} s)")
        devices = raytrain.devices_held(ctx.cfg.resources)
        ctx.meter.add_hold(e.began, max(d["ended"] for d in e.done), devices, gpu_alias(e.done[0]["device"]))
        for d in e.done:
            ctx.meter.add_worker(d["began"], d["phases"], devices / len(e.done), hold_began=e.began)
        finished[label] = e
    return finished


def _checkpoint_curves(ctx: StageContext, task_names: list[str]) -> tuple[list[dict], list[dict]]:
    """eval.checkpoints=all: the checkpoints the training stages scored while they trained (score_checkpoint), each
    scored again from its items with this stage's intervals, its predictions written, its main metrics logged to MLflow
    at its step (``eval/checkpoints/<stage>/<metric>``: a curve per stage). Returns (curve rows, while_training
    records). A checkpoint scored under other eval settings (a stage reused from the cache) is left out, said once."""
    cfg, tasks = ctx.cfg, ctx.latest("tasks")
    expected = json.loads(json.dumps(checkpoint_settings(shard_jobs(cfg, tasks, [("", "")], None)[0])))
    rows, timings = [], []
    for stage, out in ctx.inputs.items():
        if stage not in TRAINING_STAGES:
            continue
        if "checkpoint_scores" not in out.outputs:
            ctx.say(f"eval: {stage} scored no checkpoints while it trained (it ran with eval.checkpoints=final, or "
                    f"is reused from one that did); --force reruns it")
            continue
        other = []
        entries = out.outputs["checkpoint_scores"]
        for entry in entries if isinstance(entries, list) else []:
            try:
                entry = scored_checkpoint(entry, stage)
                record = read_checkpoint_score(Path(entry["file"]))
            except UserError as exc:
                ctx.say(f"warning: {exc}")
                continue
            if record["settings"] != expected or {i["task"] for i in record["items"]} != set(task_names):
                other.append(record["step"])
                continue
            label = f"{stage}-step{record['step']}"
            # each task's and the mean's scores; the per-question-type ones stay in the predictions
            main = main_metrics(record["items"], task_names, cfg.eval.bootstrap_samples, cfg.seed)
            for task in task_names:
                write_predictions([it for it in record["items"] if it["task"] == task],
                                  ctx.stage_dir / f"predictions_{label}_{task}.jsonl", TASKS[task].metric)
            ctx.tracker.log_metrics(ctx.mlflow_run_id, {f"eval/checkpoints/{stage}/{k}": v for k, v in main.items()},
                                    step=record["step"])
            rows.append({"checkpoint": label, "stage": stage, "step": record["step"], "metrics": main})
            timings.append({"checkpoint": label, "during": stage} | {
                k: entry.get(k) for k in ("began_s", "ended_s", "training_ended_s")})
        if other:
            ctx.say(f"eval: {stage}'s checkpoints at step(s) {', '.join(map(str, other))} were scored under other eval "
                    f"settings and are left out; --force reruns {stage}")
    return rows, timings


def run(ctx: StageContext) -> StageOutput:
    """Shards every checkpoint's scoring over `resources.workers` Ray tasks; the driver only merges and averages."""

    cfg = ctx.cfg
    tasks = ctx.latest("tasks")
    task_names = [k for k in TASKS if k in tasks]
    protocol, samples = cfg.eval.protocol, cfg.eval.bootstrap_samples
    metrics = prior_scores(tasks, cfg.eval.limit, samples, cfg.seed)
    targets = checkpoints(cfg, ctx.inputs)
    files = task_files(task_names, protocol)
    early = {label: e for label, e in _finished_early(ctx).items() if e.model_dir == dict(targets).get(label)}
    jobs = [job for label, e in early.items() for job in e.jobs]
    jobs += shard_jobs(cfg, tasks, [(label, d) for label, d in targets if label not in early], ctx.item_cache)
    done = [d for e in early.values() for d in e.done]
    done += raytrain.run_held(score_shard, jobs[len(done):], cfg, ctx.meter, "eval") if len(jobs) > len(done) else []
    shards = []
    for i, (label, _) in enumerate(targets):
        mine = [(job, d) for job, d in zip(jobs, done, strict=True) if job["label"] == label]
        items = [item for _, d in mine for item in d["result"]["items"]]
        scores = task_metrics(items, task_names, samples, cfg.seed)
        for task in task_names:
            write_predictions([it for it in items if it["task"] == task],
                              ctx.stage_dir / f"predictions_{label}_{task}.jsonl", TASKS[task].metric)
        prefix = "eval/" if i == len(targets) - 1 else f"eval/{label}_"
        metrics.update({f"{prefix}{k}": v for k, v in scores.items()})
        shards += [{"checkpoint": label, "shard": job["shard"], "node_id": d["node_id"], "device": d["device"],
                    "items": len(d["result"]["items"]), "generated": d["result"]["generated"],
                    "cached": d["result"]["cached"], "seconds": round(d["seconds"], 3),
                    "generation_seconds": round(d["phases"].get("generation", 0.0), 3)} for job, d in mine]
    answered = {"generated": sum(s["generated"] for s in shards), "cached": sum(s["cached"] for s in shards)}
    for error in sorted({d["result"]["cache_error"] for d in done if d["result"]["cache_error"]}):
        ctx.say(f"eval: answers not kept in the item cache ({error}); a rerun generates them again")
    if answered["cached"]:
        ctx.say(f"eval: {answered['cached']} of {sum(answered.values())} answers read from the item cache "
                f"({ctx.item_cache.directory}); --force generates them all again")
    ctx.tracker.set_tags(ctx.mlflow_run_id, {"eval.protocol": protocol, "eval.task_files": json.dumps(files)})
    keys = sorted({d["result"]["cache_key"] for d in done if d["result"]["cache_key"]})
    curves, timings = _checkpoint_curves(ctx, task_names) if cfg.eval.checkpoints == "all" else ([], [])
    return StageOutput(metrics=metrics, outputs={"scored": [label for label, _ in targets], "shards": shards,
                                                 "protocol": protocol, "task_files": files, "answers": answered,
                                                 "item_cache_keys": keys, "checkpoints": curves,
                                                 "while_training": [e.record() for e in early.values()] + timings},
                       ran_on={"shards": [{"node_id": d["node_id"], "device": d["device"], "hardware": d["hardware"]}
                                          for d in done]})
