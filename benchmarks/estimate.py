"""Predicted vs actual: `harness estimate PIPELINE --device cpu` against a real `harness run PIPELINE --force`.

    unshare --net sh -c 'ip link set lo up; exec .venv/bin/python benchmarks/estimate.py'   # ~6 min on 2 cores
    ... benchmarks/estimate.py --pipeline dpo sft.max_steps=300     # overrides go to both commands

Both run back to back on this machine, each in its own process, with a fresh output directory and MLflow store
(the real run is a first run: it creates its store, and the estimate is told so by the same tracking.uri). Writes
results/estimate.json and results/estimate.md: per stage and in total, predicted vs actual wall seconds and the
error, the load average before, between and after, and both commands. The target is a total error within 25 %.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TARGET = 0.25


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(argv: list[str], log: Path) -> tuple[float, str]:
    """Run ``argv``; its wall seconds and its stdout (stderr goes to ``log``)."""
    start = time.time()
    with open(log, "w") as f:
        done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (rc {done.returncode}):\n{done.stdout[-2000:]}\n"
                         f"{log.read_text()[-3000:]}")
    return time.time() - start, done.stdout


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def error(predicted: float, actual: float) -> float | None:
    return (predicted - actual) / actual if actual else None


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} %"


PARTS = ("start_s", "warm_s", "step_s", "busy_step_s", "save_s", "tail_s")


def actual_parts(result: dict, uri: str, experiment_name: str, calibrated: dict) -> dict:
    """Each training stage of the real run split like the calibration (harness.estimate.training_timeline), from
    its MLflow store (the stage's start: its child run's start time): what each part measured in both runs."""
    from mlflow.tracking import MlflowClient

    from harness.estimate import _step_times, training_timeline
    from stages import TRAINING

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    children = {r.data.tags.get("vlmlab.stage"): r for r in client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{result['mlflow_run_id']}'")}
    out = {}
    for record in result["stages"]:
        name = record["name"]
        if name in TRAINING and name in calibrated:
            run = children[name]
            save_steps = result["config"][name]["save_steps"]
            real = training_timeline(record, run.info.start_time / 1000.0,
                                     _step_times(client, run.info.run_id, name), save_steps)
            out[name] = {part: {"calibration": round(calibrated[name][part], 4), "run": round(real[part], 4)}
                         for part in PARTS}
    return out


def gpu_fit() -> list[dict]:
    """The GPU step model (harness/estimate.py) against the H200 measurements it was fitted to (results/gpu/)."""
    from harness.estimate import DEVICES, MFU, forward_flops, step_floor

    peak = DEVICES["H200"].peak_tflops * 1e12 * MFU
    rows = []
    smol = {"params_other": 7077888 + 134588736, "params_vision": 86433024, "patches": 1024, "vision_layers": 12,
            "vision_width": 768, "text_layers": 30, "text_width": 576, "param_tensors": 470}  # SmolVLM-256M shapes
    for path in sorted((ROOT / "results" / "gpu").glob("gpu_bf16_b*.json")):
        run = json.loads(path.read_text())
        flops = 3 * forward_flops(smol, run["sequence_length"]) * run["batch_size"]
        rows.append({"run": f"{path.name}: SmolVLM-256M-sized, batch {run['batch_size']}, bare loop",
                     "measured_ms": 1000 * run["step_seconds_median"],
                     "model_ms": 1000 * (step_floor(smol) + flops / peak)})
    tiny = ROOT / "results" / "gpu" / "tiny_sft_bf16.json"
    if tiny.exists():
        run = json.loads(tiny.read_text())
        shape = {"params_other": 2536128, "params_vision": 627968, "patches": 64, "vision_layers": 3,
                 "vision_width": 128, "text_layers": 4, "text_width": 192, "param_tensors": 92}  # the tiny preset
        flops = 3 * forward_flops(shape, 44.9) * 32
        rows.append({"run": "tiny_sft_bf16.json: the default preset's SFT through TRL, batch 32 (inside steps)",
                     "measured_ms": 1000 * run["busy_seconds"] / run["steps"],
                     "model_ms": 1000 * (step_floor(shape) + flops / peak)})
    for row in rows:
        row["error"] = error(row["model_ms"], row["measured_ms"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="sft")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both commands")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from runtime.config import load_config

    cfg = load_config(None, args.overrides)
    work = Path(tempfile.mkdtemp(prefix="vlmlab-bench-estimate-"))
    store = f"tracking.uri=sqlite:///{work / 'real' / 'mlflow.db'}"
    # every device (cpu, this machine, among them): one calibration serves them all
    estimate_cmd = [str(BIN / "harness"), "estimate", args.pipeline, *args.overrides, store, "--json"]
    run_cmd = [str(BIN / "harness"), "run", args.pipeline, *args.overrides, store, "--force",
               "--output-dir", str(work / "real" / "runs")]
    (work / "real").mkdir()
    loads = {"before": load()}
    print(f"work directory: {work}", file=sys.stderr, flush=True)
    estimate_wall, text = timed(estimate_cmd, work / "estimate.log")
    estimate = json.loads(text)
    (work / "estimate.json").write_text(text)  # kept if the real run does not finish
    loads["between"] = load()
    run_wall, _ = timed(run_cmd, work / "run.log")
    loads["after"] = load()
    result_path = next((work / "real" / "runs").glob("*/result.json"))
    result = json.loads(result_path.read_text())

    parts = actual_parts(result, store.split("=", 1)[1], cfg.tracking.experiment, estimate["calibration"]["stages"])
    predicted = estimate["devices"]["cpu"]
    rows = []
    for record in result["stages"]:
        name = record["name"]
        p, a = predicted["stages"][name]["wall_s"], record["wall_seconds"]
        rows.append({"stage": name, "predicted_s": round(p, 2), "actual_s": round(a, 2), "error": error(p, a)})
    outside_actual = run_wall - sum(r["wall_seconds"] for r in result["stages"])
    rows.append({"stage": "outside stages", "predicted_s": round(predicted["overhead_s"], 2),
                 "actual_s": round(outside_actual, 2), "error": error(predicted["overhead_s"], outside_actual)})
    stage_sum_p = sum(s["wall_s"] for s in predicted["stages"].values())
    stage_sum_a = sum(r["wall_seconds"] for r in result["stages"])
    total_error = error(predicted["total_s"], run_wall)
    calib = estimate["calibration"]
    out = {
        "benchmark": "estimate_vs_actual", "pipeline": args.pipeline, "overrides": args.overrides,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git("rev-parse", "--short",
                                                                                          "HEAD"),
        "dirty": bool(git("status", "--porcelain")), "machine": {"cpus": os.cpu_count(),
                                                                 "python": platform.python_version()},
        "tasks": {k: v.model_dump(exclude_defaults=True) for k, v in cfg.data.tasks.items()},
        "commands": {"estimate": " ".join(estimate_cmd).replace(str(BIN) + "/", "").replace(str(work), "$WORK"),
                     "run": " ".join(run_cmd).replace(str(BIN) + "/", "").replace(str(work), "$WORK")},
        "load_average_1_5_15": loads,
        "estimate_process_s": round(estimate_wall, 2), "calibration_pipeline_s": round(calib["calibration_wall_s"], 2),
        "run_process_s": round(run_wall, 2), "predicted_total_s": round(predicted["total_s"], 2),
        "total_error": total_error, "stages_error": error(stage_sum_p, stage_sum_a),
        "predicted_stages_s": round(stage_sum_p, 2), "actual_stages_s": round(stage_sum_a, 2),
        "within_target": total_error is not None and abs(total_error) <= TARGET, "target": TARGET,
        "rows": rows, "training_parts": parts, "gpu_model_fit": gpu_fit(), "predicted_usd": predicted["usd"],
        "actual_cost_usd_held": result["cost_usd"],
        "assumptions": estimate["assumptions"],
        "other_devices": {d: {"total_s": round(v["total_s"], 1), "usd": v["usd"]}
                          for d, v in estimate["devices"].items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "estimate.json").write_text(json.dumps(out, indent=1) + "\n")
    (args.out / "estimate.md").write_text(markdown(out))
    print(json.dumps({k: out[k] for k in ("predicted_total_s", "run_process_s", "total_error", "within_target")}))


def markdown(out: dict) -> str:
    lines = [
        "# `harness estimate` vs a real run",
        "",
        f"Measured {out['date']} on commit {out['commit']}{' (with uncommitted changes)' if out['dirty'] else ''}, "
        f"{out['machine']['cpus']} CPU cores shared with other work (`benchmarks/estimate.py`; JSON: "
        "`results/estimate.json`). The estimate and the real run ran back to back, each a fresh process with a "
        "fresh output directory and MLflow store.",
        "",
        f"Pipeline `{out['pipeline']}`, default preset (`configs/tiny.yaml`)"
        + (f" with `{' '.join(out['overrides'])}`" if out["overrides"] else "") + "; tasks: "
        + ", ".join(f"{k} ({', '.join(f'{kk} {vv}' for kk, vv in v.items())})" for k, v in out["tasks"].items())
        + ".",
        "",
        "```",
        out["commands"]["estimate"],
        out["commands"]["run"],
        "```",
        "",
        "| stage | predicted (s) | actual (s) | error |",
        "| --- | --- | --- | --- |",
    ]
    for r in out["rows"]:
        lines.append(f"| {r['stage']} | {r['predicted_s']:.1f} | {r['actual_s']:.1f} | {pct(r['error'])} |")
    lines += [
        f"| stages | {out['predicted_stages_s']:.1f} | {out['actual_stages_s']:.1f} | {pct(out['stages_error'])} |",
        f"| **total (process wall)** | **{out['predicted_total_s']:.1f}** | **{out['run_process_s']:.1f}** | "
        f"**{pct(out['total_error'])}** |",
        "",
        f"Total error {pct(out['total_error'])}: {'within' if out['within_target'] else 'outside'} the "
        f"±{100 * out['target']:.0f} % target. The estimate itself took {out['estimate_process_s']:.0f} s "
        f"(its calibration pipeline {out['calibration_pipeline_s']:.0f} s).",
        "",
        "Load average (1, 5, 15 min): " + ", ".join(
            f"{k} {'/'.join(str(x) for x in v)}" for k, v in out["load_average_1_5_15"].items()) + ".",
        "",
        "Training stages split into parts (harness/estimate.py `training_timeline`), in the calibration and in "
        "the real run (seconds):",
        "",
        "| stage | part | calibration | real run |",
        "| --- | --- | --- | --- |",
        *[f"| {stage} | {part.removesuffix('_s')} | {v['calibration']:.3f} | {v['run']:.3f} |"
          for stage, parts in out["training_parts"].items() for part, v in parts.items()],
        "",
        "The GPU step model (device work: floor + FLOPs / (peak x MFU)) against the H200 step times it was fitted "
        "to (`results/gpu/`; the only GPU measured). In-sample: this shows the fit, it does not validate the model "
        "on other GPUs or models:",
        "",
        "| measurement | measured (ms/step) | model (ms/step) | error |",
        "| --- | --- | --- | --- |",
        *[f"| {r['run']} | {r['measured_ms']:.1f} | {r['model_ms']:.1f} | {pct(r['error'])} |"
          for r in out["gpu_model_fit"]],
        "",
        "Predicted for the other devices (same calibration; modelled, not measured):",
        "",
        "| device | wall (s) | USD |",
        "| --- | --- | --- |",
        *[f"| {d} | {v['total_s']:.1f} | {v['usd']:.4f} |" for d, v in out["other_devices"].items()],
        "",
        "Assumptions, as `harness estimate` printed them:",
        "",
        *[f"- {line}" for line in out["assumptions"]],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
