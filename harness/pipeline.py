"""Run a pipeline: its stages in order, each in an MLflow child run, ending in `<run dir>/result.json`.

Finished stages are reused from the stage cache when their key is unchanged (`force=True` recomputes).
Any exception closes every open MLflow run as FAILED (KILLED on Ctrl-C) and writes no result.json; the stages
that finished stay cached, so the same command resumes.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from harness.cache import StageCache, stage_key
from harness.config import PipelineConfig
from harness.cost import Meter
from harness.errors import UserError
from harness.inputs import check_inputs
from harness.manifest import build_manifest
from harness.secrets import redact
from harness.tracking import Tracker
from stages import STAGES, StageContext, StageOutput


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    def __init__(self, cfg: PipelineConfig, pipeline: str, root: Path, force: bool, console,
                 parent_run_id: str | None = None):
        self.cfg, self.pipeline, self.force, self.console = cfg, pipeline, force, console
        self.outer_run_id = parent_run_id
        self.resolved = redact(cfg.model_dump(mode="json"))  # what is written and logged: no secrets
        self.cache = StageCache(root / ".cache", warn=self.say)
        self.tracker = Tracker(cfg.tracking.resolved_uri(), cfg.tracking.experiment)  # fails if unreachable
        for run_id in self.tracker.reap_stale():
            self.say(f"mlflow: run {run_id} of a process that no longer exists marked KILLED")
        self.run_id = cfg.run_name or new_run_id(pipeline)
        self.run_dir = root / self.run_id
        if self.run_dir.exists():
            raise UserError(f"run directory already exists: {self.run_dir} (choose another run_name)")

    def say(self, text: str) -> None:
        if self.console:
            self.console.print(text)

    def run(self) -> dict:
        self.run_dir.mkdir(parents=True)
        self.tracker.attach_outbox(self.run_dir / "mlflow_outbox.jsonl", warn=self.say)
        atomic_write(self.run_dir / "config.yaml", yaml.safe_dump(self.resolved, sort_keys=False))
        manifest = build_manifest(self.cfg.seed, self.cfg.config_hash())
        tracker = self.tracker
        self.parent = tracker.start(self.run_id, parent_id=self.outer_run_id,
                                    tags={"vlmlab.pipeline": self.pipeline, "vlmlab.run_dir": str(self.run_dir)})
        with tracker.closing_on_error():
            tracker.log_params(self.parent, self.resolved)
            tracker.set_tags(self.parent, {"manifest": manifest})
            tracker.log_artifact(self.parent, str(self.run_dir / "config.yaml"))
            outputs: dict[str, StageOutput] = {}
            records, keys = [], []
            for name in self.cfg.stages_of(self.pipeline):
                key = stage_key(name, STAGES[name].CONFIG_KEYS, self.resolved, keys)
                records.append(self._stage(name, key, outputs))
                keys.append(key)
            result = self._assemble(records, outputs, manifest)
            atomic_write(self.run_dir / "result.json", json.dumps(result, indent=2))
            tracker.log_metrics(self.parent, result["metrics"] | {
                "cost/usd": result["cost_usd"], "cost/accelerator_hours": result["accelerator_hours"],
                "cost/busy_hours": result["busy_hours"], "cost/utilization": result["utilization"]})
            tracker.log_artifact(self.parent, str(self.run_dir / "result.json"))
            tracker.end(self.parent, "FINISHED")
        return result | {"run_dir": str(self.run_dir)}

    def _stage(self, name: str, key: str, outputs: dict[str, StageOutput]) -> dict:
        stage_dir = self.run_dir / name
        stage_dir.mkdir(parents=True, exist_ok=True)
        child = self.tracker.start(name, parent_id=self.parent, tags={"vlmlab.stage": name, "vlmlab.key": key})
        if self.console:
            self.console.rule(f"[bold]stage {name}")
        entry = None if self.force else self.cache.lookup(name, key)
        if entry is not None:
            record = entry["record"] | {"reused_from": entry["stage_dir"], "wall_seconds_this_run": 0.0}
            outputs[name] = StageOutput(metrics=record["metrics"], outputs=entry["outputs"])
            self.say(f"stage {name}: reused from cache ({entry['stage_dir']})")
        else:
            if self.force:
                self.cache.clear_ray(name, key)
            record, outputs[name] = self._compute(name, key, stage_dir, outputs, child)
            self.cache.store(name, key, stage_dir, record, outputs[name].outputs)
        record = record | {"key": key}
        atomic_write(stage_dir / "stage.json", json.dumps(record, indent=2, default=str))
        self.tracker.set_tags(child, {"vlmlab.reused": "reused_from" in record})
        self.tracker.log_metrics(child, record["metrics"] | record["cost"] | {"wall_seconds": record["wall_seconds"]})
        self.tracker.log_artifact(child, str(stage_dir / "stage.json"))
        self.tracker.end(child, "FINISHED")
        return record

    def _compute(self, name, key, stage_dir, outputs, child) -> tuple[dict, StageOutput]:
        cfg = self.cfg
        meter = Meter()
        storage, ray_name = self.cache.ray_storage(name, key)
        ctx = StageContext(name=name, cfg=cfg, run_dir=self.run_dir, stage_dir=stage_dir, inputs=dict(outputs),
                           tracker=self.tracker, mlflow_run_id=child, meter=meter,
                           ray_storage=storage, ray_name=ray_name)
        start = time.perf_counter()
        out = STAGES[name].run(ctx)
        wall = time.perf_counter() - start
        cost = meter.summary(cfg.cost.prices, cfg.cost.price_per_hour)
        record = {"name": name, "metrics": out.metrics, "wall_seconds": wall,
                  "accelerator_hours": cost["cost/accelerator_hours"], "cost_usd": cost["cost/usd"],
                  "device": meter.kind, "devices": meter.devices, "cost": cost, "outputs": out.outputs}
        if out.ran_on:
            record["ran_on"] = out.ran_on
        self.say(f"stage {name} done in {wall:.1f}s")
        return record, out

    def _assemble(self, records, outputs, manifest) -> dict:
        metrics: dict[str, float] = {}
        for record in records:
            metrics.update(record["metrics"])
        data_fp = next((o.outputs["data_fingerprints"] for o in outputs.values()
                        if "data_fingerprints" in o.outputs), {})
        model = next((o.outputs for o in outputs.values() if "model_source" in o.outputs), {})
        manifest = manifest | {"data_fingerprints": data_fp, "model_source": model.get("model_source"),
                               "model_weights_sha256": model.get("weights_sha256")}
        workers = worker_hardware(records)
        if workers:  # the hardware the work ran on (Ray workers), not the driver's
            manifest = manifest | {"driver_hardware": manifest["hardware"],
                                   "hardware": workers[0] if len(workers) == 1 else workers}
        self.tracker.set_tags(self.parent, {"manifest.data_fingerprints": data_fp,
                                            "manifest.model_source": model.get("model_source")})
        fresh = [r for r in records if "reused_from" not in r]
        held = sum(r["accelerator_hours"] for r in records)
        busy = sum(r["cost"].get("cost/busy_hours", 0.0) for r in records)
        return {
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
        }


def run_pipeline(cfg: PipelineConfig, pipeline: str, output_dir: str | None = None, console=None,
                 force: bool = False, parent_run_id: str | None = None) -> dict:
    """Run ``pipeline`` (a name in ``cfg.pipelines``); return the result dict also written to result.json.

    ``cost_usd`` is what the result cost to produce (reused stages count at their original cost);
    ``cost_usd_this_run`` is what this invocation spent. ``parent_run_id`` nests the pipeline's MLflow run
    (e.g. under a sweep).
    """
    for name in cfg.stages_of(pipeline):
        STAGES[name].check(cfg)
    check_inputs(cfg, cfg.stages_of(pipeline), say=console.print if console else print)  # price, data, secrets
    root = Path(output_dir or cfg.output_dir).expanduser().resolve()
    return _Runner(cfg, pipeline, root, force, console, parent_run_id).run()
