"""Run a pipeline: its stages in order, each in an MLflow child run, ending in `<run dir>/result.json`.

Finished stages are reused from the stage cache when their key is unchanged (`force=True` recomputes).
Any exception closes every open MLflow run as FAILED (KILLED on Ctrl-C) and writes no result.json; the stages
that finished stay cached, so the same command resumes.
"""
from __future__ import annotations

import json
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml
from rich.text import Text

from harness import codeprint
from harness.cache import StageCache, stage_key
from harness.codeprint import TreeHasher
from harness.console import Display, finished_note
from harness.inputs import check_inputs, fit_run
from harness.reproduce import reproduction_record
from harness.storage import OutputDir
from runtime.atomic import atomic_write
from runtime.config import (
    SCHEMA_VERSION,
    TRAINING_STAGES,
    PipelineConfig,
    TrainStageConfig,
    config_values,
    output_dir_problem,
)
from runtime.cost import Meter
from runtime.errors import ConfigError, UserError
from runtime.lease import Lease
from runtime.manifest import build_manifest
from runtime.output import active_stage
from runtime.secrets import redact
from runtime.tracking import Tracker, latest_step
from stages import STAGES, StageContext, StageOutput

NOT_PATHS = {"tiny", "random", "compose", "synthetic", "tasks"}  # source values that name a generator, not a directory


def worker_hardware(records: list[dict]) -> list[dict]:
    """The distinct hardware the stages' Ray workers ran on (training ranks, eval and generation shards)."""
    seen: list[dict] = []
    for record in records:
        ran_on = record.get("ran_on", {})
        for hw in [ran_on.get("hardware"), *(s.get("hardware") for s in ran_on.get("shards", []))]:
            if hw and hw not in seen:
                seen.append(hw)
    return seen


def new_run_id(pipeline: str) -> str:
    return f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{pipeline}-{secrets.token_hex(3)}"


class _Runner:
    def __init__(self, cfg: PipelineConfig, pipeline: str, out: OutputDir, force: bool, console,
                 parent_run_id: str | None = None, display: Display | None = None, fitted: dict | None = None):
        self.cfg, self.pipeline, self.force, self.console = cfg, pipeline, force, console
        self.fitted = fitted or {}  # resources.fit's choices (stages/support/fit.py): in the config already
        self.display, self._own_display = display or Display(console), display is None
        self.outer_run_id = parent_run_id
        self.resolved = redact(cfg.model_dump(mode="json"))  # what is written and logged: no secrets
        self.out, root = out, out.local  # a bucket's run directories are worked on in its local mirror
        self.cache = StageCache(root / ".cache", warn=self.say, remote=out if out.uri else None)
        self.run_id = cfg.run_name or new_run_id(pipeline)
        self.keys: dict[str, str] = {}  # each stage's cache key
        self.early: dict = {}  # label -> stages.eval.Early: the eval's scorings started while training ran
        self.run_dir = root / self.run_id
        # what can refuse the run comes before anything is written: a finished run_name (read-only to check), the
        # tracking store (fails if unreachable; a SQLite file is created here, on first use), the run's lease (and,
        # holding it, finished once more: a concurrent run of the same name may have finished meanwhile)
        self._refuse_finished()
        self.tracker = Tracker(cfg.tracking.resolved_uri(), cfg.tracking.experiment)
        self.run_lease = Lease(self.cache.root / "leases" / f"run-{self.run_id}")
        owner = self.run_lease.try_acquire()
        if owner is not None:
            raise UserError(f"run '{self.run_id}' is in progress in another process (pid {owner['pid']} on "
                            f"{owner['host']}): wait for it to finish, or choose another run_name")
        try:  # holding the lease: anything that fails from here gives it back (run() does once this returns)
            self._refuse_finished()
            self.tracker.reap_stale(say=self.say)
            self.hasher = TreeHasher(self.cache.root / "fingerprints.json")
        except BaseException:
            self.run_lease.release()
            raise

    def _refuse_finished(self) -> None:
        done = self.run_dir / "result.json"
        if self.out.has(done) and not self.force:
            raise UserError(f"run '{self.run_id}' has already finished ({self.out.uri_of(done)}): rerun with --force "
                            "to recompute it, or choose another run_name")

    def say(self, text: str) -> None:
        self.display.say(text)

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.hasher.save()
            self.run_lease.release()
            if self._own_display:
                self.display.close()

    def _run(self) -> dict:
        """An existing run directory (same run_name, interrupted) is resumed: its stages come from the cache."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.display.open_run(self.run_dir)  # from here on, library output goes to <run dir>/logs/
        self.tracker.attach_outbox(self.run_dir / "mlflow_outbox.jsonl", warn=self.say)
        atomic_write(self.run_dir / "config.yaml", yaml.safe_dump(self.resolved, sort_keys=False))
        self.out.push(self.run_dir / "config.yaml")
        manifest = build_manifest(self.cfg.seed, self.cfg.config_hash()) | ({"fit": self.fitted} if self.fitted else {})
        self.git_sha = manifest["git"]["sha"]
        tracker = self.tracker
        self.parent = tracker.start(self.run_id, parent_id=self.outer_run_id,
                                    tags={"vlmlab.pipeline": self.pipeline, "vlmlab.run_dir": str(self.run_dir)})
        with tracker.closing_on_error():
            tracker.log_params(self.parent, self.resolved)
            tracker.set_tags(self.parent, {"manifest": manifest}
                             | ({"vlmlab.fit": {k: {f: v.get(f) for f in ("batch_size", "gradient_accumulation_steps",
                                                                          "gradient_checkpointing", "predicted_gib")}
                                                for k, v in self.fitted["stages"].items()}} if self.fitted else {}))
            tracker.log_artifact(self.parent, str(self.run_dir / "config.yaml"))
            outputs: dict[str, StageOutput] = {}
            records, keys, codes = [], [], []
            names = self.cfg.stages_of(self.pipeline)
            for name in names:  # every key first: a training stage looks ahead to the eval's
                depends, code = self._depends(name)
                keys.append(stage_key(name, STAGES[name].CONFIG_KEYS, self.resolved, keys, depends))
                codes.append(code)
            self.keys = dict(zip(names, keys, strict=True))
            for (name, key), code in zip(self.keys.items(), codes, strict=True):
                records.append(self._stage(name, key, outputs, code))
            result = self._assemble(records, outputs, manifest)
            atomic_write(self.run_dir / "result.json", json.dumps(result, indent=2))
            logs = self.display.log_files() if self.out.uri else []  # a bucket gets the logs too
            self.out.push(*logs, self.run_dir / "result.json")
            if self.out.uri:
                self.say(f"run uploaded to {self.out.uri_of(self.run_dir)}")
            tracker.log_metrics(self.parent, result["metrics"] | {
                "cost/usd": result["cost_usd"], "cost/accelerator_hours": result["accelerator_hours"],
                "cost/busy_hours": result["busy_hours"], "cost/utilization": result["utilization"]})
            tracker.log_artifact(self.parent, str(self.run_dir / "result.json"))
            tracker.end(self.parent, "FINISHED")
        return result | {"run_dir": str(self.run_dir)}

    def _depends(self, name: str) -> tuple[dict, dict]:
        """What stage ``name``'s result depends on besides its config (for its key), and the record of its code."""
        module = STAGES[name]
        files = codeprint.code_manifest(f"stages.{name}", getattr(module, "DATA_FILES", ()))
        raw = self.cfg.model_dump(mode="json")
        sources = {}
        for pattern in getattr(module, "SOURCE_KEYS", ()):
            for dotted, value in config_values(raw, pattern).items():
                if isinstance(value, str) and value not in NOT_PATHS and Path(value).expanduser().exists():
                    sources[dotted] = self.hasher.fingerprint(Path(value).expanduser())
        depends = {"code": codeprint.fingerprint(files), "packages": codeprint.dependency_versions(),
                   "sources": sources}
        return depends, {"fingerprint": depends["code"], "git_sha": self.git_sha, "files": files}

    def _progress_from(self, name: str, run_id: str):
        """A training stage's progress as its rank 0 streams it to MLflow: the console's fallback where rank 0's
        progress file is on another node."""
        stage = getattr(self.cfg, name, None)
        if not isinstance(stage, TrainStageConfig):
            return None
        batch = stage.batch_size * stage.gradient_accumulation_steps * self.cfg.resources.workers
        return lambda: latest_step(self.tracker.client, run_id, name, stage.max_steps, batch)

    def _stage(self, name: str, key: str, outputs: dict[str, StageOutput], code: dict) -> dict:
        stage_dir = self.run_dir / name
        stage_dir.mkdir(parents=True, exist_ok=True)
        child = self.tracker.start(name, parent_id=self.parent, tags={"vlmlab.stage": name, "vlmlab.key": key})
        if self.console and self.display.verbose:
            self.console.rule(Text(f"stage {name}", style="bold"))
        lease = None
        entry = None if self.force else self.cache.lookup(name, key)
        if entry is None and not self.force:  # one run computes a key at a time; the others then reuse it
            lease = self.cache.lease(name, key)
            lease.acquire(on_wait=lambda owner: self.say(
                f"stage {name}: waiting for the run computing the same stage (pid {owner['pid']} on {owner['host']}); "
                "its result will be reused"))
            entry = self.cache.lookup(name, key)
        self.display.begin_stage(name, self._progress_from(name, child))  # output to logs/<stage>.log, progress shown
        try:
            if entry is not None:
                record = entry["record"] | {"reused_from": entry["stage_dir"], "wall_seconds_this_run": 0.0}
                outputs[name] = StageOutput(metrics=record["metrics"], outputs=entry["outputs"])
                self.say(f"stage {name}: reused from cache ({entry['stage_dir']})")
            else:
                record, outputs[name] = self._compute(name, key, stage_dir, outputs, child)
                for early in self.early.values():
                    if early.during == name:
                        early.training_ended = time.time()
                record["code"] = code
                self.cache.store(name, key, stage_dir, record, outputs[name].outputs)
        finally:
            self.display.end_stage(name)
            if lease is not None:
                lease.release()
        record = record | {"key": key}
        atomic_write(stage_dir / "stage.json", json.dumps(record, indent=2, default=str))
        self.out.push(stage_dir / "stage.json")  # its files and cache entry went up when it was stored
        self.tracker.set_tags(child, {"vlmlab.reused": "reused_from" in record})
        self.tracker.log_metrics(child, record["metrics"] | record["cost"] | {"wall_seconds": record["wall_seconds"]})
        self.tracker.log_artifact(child, str(stage_dir / "stage.json"))
        self.tracker.end(child, "FINISHED")
        return record

    def _eval_runs(self) -> bool:
        """Whether this run's pipeline scores: it has an eval stage the cache does not give."""
        return "eval" in self.keys and (self.force or self.cache.lookup("eval", self.keys["eval"]) is None)

    def _score_while_training(self, name: str, outputs: dict[str, StageOutput]) -> None:
        """Before training stage ``name``: where the pipeline's eval will run, score the models made so far on spare
        workers while it trains (eval.while_training; stages/eval.py)."""
        if not self._eval_runs():
            return
        started = STAGES["eval"].score_while_training(self.cfg, outputs, name, self._item_cache(),
                                                      {e.model_dir for e in self.early.values()})
        for early in started:
            self.early[early.label] = early
            self.say(f"eval: scoring {early.label} on {len(early.refs)} spare worker(s) while {name} trains")

    def _item_cache(self):
        return self.cache.item_cache(self.run_id if self.force else None)

    def _compute(self, name, key, stage_dir, outputs, child) -> tuple[dict, StageOutput]:
        cfg = self.cfg
        meter = Meter()
        live = active_stage()
        if live is not None:  # the console's "$ so far"
            live.cost = lambda: meter.usd_so_far(cfg.cost.prices, cfg.cost.price_per_hour)
        # --force works in a Ray storage of its own: it never resumes from, nor deletes, another run's checkpoints
        storage, ray_name = self.cache.ray_storage(name, key, attempt=self.run_id if self.force else None)
        ctx = StageContext(name=name, cfg=cfg, run_dir=self.run_dir, stage_dir=stage_dir, inputs=dict(outputs),
                           tracker=self.tracker, mlflow_run_id=child, meter=meter,
                           ray_storage=storage, ray_name=ray_name, say=self.say,
                           item_cache=self._item_cache(), early=self.early if name == "eval" else {},
                           score_checkpoints=name in TRAINING_STAGES and cfg.eval.checkpoints == "all"
                           and self._eval_runs())
        start = time.perf_counter()
        if name in TRAINING_STAGES:  # inside the stage's time: the room check may start the local Ray
            self._score_while_training(name, outputs)
        out = STAGES[name].run(ctx)
        wall = time.perf_counter() - start
        cost = meter.summary(cfg.cost.prices, cfg.cost.price_per_hour)
        record = {"name": name, "metrics": out.metrics, "wall_seconds": wall,
                  "accelerator_hours": cost["cost/accelerator_hours"], "cost_usd": cost["cost/usd"],
                  "device": meter.device, "devices": meter.devices, "cost": cost, "outputs": out.outputs}
        if meter.held_seconds:  # device-seconds per phase (runtime.cost.PHASES): what the held time went to
            record["held"] = {phase: round(seconds, 3) for phase, seconds in meter.split().items()}
        if out.ran_on:
            record["ran_on"] = out.ran_on
        if name in self.fitted.get("stages", {}):  # what resources.fit chose for it, and why
            record["fit"] = self.fitted["stages"][name]
        self.say(f"stage {name} done in {wall:.1f}s{finished_note(out.metrics, name, cost['cost/usd'])}")
        return record, out

    def _assemble(self, records, outputs, manifest) -> dict:
        metrics: dict[str, float] = {}
        for record in records:
            metrics.update(record["metrics"])
        data_fp = next((o.outputs["data_fingerprints"] for o in outputs.values()
                        if "data_fingerprints" in o.outputs), {})
        data_src = next((o.outputs["sources"] for o in outputs.values() if "data_fingerprints" in o.outputs
                         and "sources" in o.outputs), {})
        model = next((o.outputs for o in outputs.values() if "model_source" in o.outputs), {})
        manifest = manifest | {"data_fingerprints": data_fp, "data_sources": data_src,
                               "model_source": model.get("model_source"),
                               "model_weights_sha256": model.get("weights_sha256")}
        workers = worker_hardware(records)
        if workers:  # the hardware the work ran on (Ray workers), not the driver's
            manifest = manifest | {"driver_hardware": manifest["hardware"],
                                   "hardware": workers[0] if len(workers) == 1 else workers}
        threads = max(1, int(self.cfg.resources.cpus_per_worker))  # each worker's torch threads
        manifest["reproduction"] = reproduction_record(records, workers or [manifest["hardware"]], threads)
        self.tracker.set_tags(self.parent, {"manifest.data_fingerprints": data_fp,
                                            "manifest.model_source": model.get("model_source")})
        fresh = [r for r in records if "reused_from" not in r]
        held = sum(r["accelerator_hours"] for r in records)
        busy = sum(r["cost"].get("cost/busy_hours", 0.0) for r in records)
        return {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "mlflow_run_id": self.parent,
            "pipeline": self.pipeline,
            "config": self.resolved,
            "stages": records,
            "metrics": metrics,
            "accelerator_hours": sum(r["accelerator_hours"] for r in records),
            "cost_usd": sum(r["cost_usd"] for r in records),
            "cost_usd_this_run": sum(r["cost_usd"] for r in fresh),
            "busy_hours": busy,
            "utilization": busy / held if held else 0.0,
            "wall_seconds": sum(r.get("wall_seconds_this_run", r["wall_seconds"]) for r in records),
            "reused_stages": [r["name"] for r in records if "reused_from" in r],
            "manifest": manifest,
            **({"fit": self.fitted} if self.fitted else {}),
        }


def run_pipeline(cfg: PipelineConfig, pipeline: str, output_dir: str | None = None, console=None,
                 force: bool = False, parent_run_id: str | None = None, display: Display | None = None) -> dict:
    """Run ``pipeline`` (a name in ``cfg.pipelines``); return the result dict also written to result.json.

    ``cost_usd`` is what the result cost to produce (reused stages count at their original cost);
    ``cost_usd_this_run`` is what this invocation spent. ``parent_run_id`` nests the pipeline's MLflow run
    (e.g. under a sweep). ``display`` (harness/console.py) is the console of `harness run`: live progress, logs.
    """
    problem = output_dir_problem(output_dir) if output_dir else None  # --output-dir (the config's is validated)
    if problem:
        raise ConfigError(f"--output-dir: {problem}")
    for name in cfg.stages_of(pipeline):
        STAGES[name].check(cfg)
    say = display.say if display is not None else console.print if console else print
    check_inputs(cfg, cfg.stages_of(pipeline), say=say)  # price, data, secrets
    cfg, fitted = fit_run(cfg, cfg.stages_of(pipeline), say=say)  # resources.fit: batch sizes for the device
    out = OutputDir(output_dir or cfg.output_dir)  # a directory, or a bucket URI (s3://, gs://): harness/storage.py
    return _Runner(cfg, pipeline, out, force, console, parent_run_id, display, fitted).run()
