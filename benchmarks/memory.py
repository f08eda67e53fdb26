"""The memory plan of the model sizes users run, and the plan checked against real steps (issue #33).

    .venv/bin/python benchmarks/memory.py            # ~30 min on 2 cores; writes results/memory.{md,json}
    .venv/bin/python benchmarks/memory.py --skip-checks     # the per-device table only

1. Per architecture (SmolVLM-256M, -500M, -2.2B with random weights) x device stage (sft, dpo, eval) x device (T4, L4,
   A10G, A100 80 GB, H100): the predicted peak at the T4 preset's settings (fp16, LoRA, sft batch 8 x 4, dpo 4 x 8,
   eval batch 32, the 4x4 tile grid of longest edge 2048), whether it fits, the micro-batch resources.fit=auto picks,
   the FLOPs of a step (stages/support/memory.py; stages/support/fit.py).
2. The plan against the same step at full depth with real tensors on this CPU (fp32), each in a fresh process: the
   peak by torch's memory tracker (target: within 5 %) and the process's peak RSS over its RSS before the model was
   built (an independent measure; target: within 15 %), for the tiny default (sft, dpo at their batches) and
   SmolVLM-256M (sft, dpo at batch 1, a 2x2 grid).
3. SmolVLM-256M's CPU seconds per SFT step at batch 1 (2x2 and 4x4 grids), measured (a plain step, no tracker)
   beside what `harness estimate --device cpu` predicts for this machine from the traced step (target: within 25 %).
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
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from runtime.config import load_config  # noqa: E402
from stages.support import fit, memory  # noqa: E402

GIB = 2 ** 30
ARCHITECTURES = ("smolvlm-256m", "smolvlm-500m", "smolvlm-2.2b")
DEVICES = {"T4": 16, "L4": 24, "A10G": 24, "A100 (80 GB)": 80, "H100": 80}
STAGES = ("sft", "dpo", "eval")
PRESET = "smolvlm-256m-t4"
SYNTHETIC = ["data.tasks.vqa.source=synthetic", "data.tasks.chartqa.source=synthetic", "resources.use_gpu=true",
             "resources.fit=off"]  # planned for a GPU run: the preset's fp16 is its precision


def preset(architecture: str, extra: list[str] = ()):
    return load_config(PRESET, ["model.source=random", f"model.architecture={architecture}", *SYNTHETIC, *extra])


def plan_table() -> list[dict]:
    rows = []
    for architecture in ARCHITECTURES:
        cfg = preset(architecture)
        standin = fit.standin_rows(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            shell = fit.model_shell(cfg, standin, Path(tmp) / "model")
            start = time.perf_counter()
            plans = fit.plans_for(cfg, ["sft", "dpo", "eval"], shell, standin, rows_from="synthetic rows")
            traced_s = time.perf_counter() - start
        for stage in STAGES:
            plan = plans[stage]
            if stage == "eval":
                generation = [plans["eval"], plans["dpo-generate"]]
                batch, accumulation = cfg.eval.batch_size, 1
                peak = max(p.peak(batch) for p in generation)
            else:
                section = getattr(cfg, stage)
                batch, accumulation = section.batch_size, section.gradient_accumulation_steps
                peak = plan.peak(batch, accumulation)
            for device, gib in DEVICES.items():
                budget = fit.usable_bytes(gib)
                if stage == "eval":
                    picked = next((b for b in range(batch, 0, -1) if all(p.peak(b) <= budget for p in generation)),
                                  None)
                else:
                    choice = fit.training_choice(stage, getattr(cfg, stage), {False: plan}, budget)
                    picked = f"{choice.batch_size} x {choice.gradient_accumulation_steps}" if choice else None
                rows.append({"architecture": architecture, "stage": stage, "device": device, "device_gib": gib,
                             "peak_gib": peak / GIB, "fits": peak <= budget, "fit_batch": picked,
                             "step_flops": plan.flops(batch, accumulation), "batch": f"{batch} x {accumulation}",
                             "fixed_gib": plan.fixed / GIB, "per_sample_gib": plan.per_sample / GIB,
                             "tokens": plan.tokens, "traced_s": round(traced_s, 1)})
        print(f"{architecture}: planned in {traced_s:.0f} s", flush=True)
    return rows


def measure_in_process(spec: dict) -> dict:
    """Inside a fresh process: the full-depth step with real tensors, its tracker peak and its resident count."""
    import torch

    torch.set_num_threads(2)
    cfg = load_config(spec["config"], spec["overrides"])
    standin = fit.standin_rows(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        shell = fit.model_shell(cfg, standin, Path(tmp) / "model")
        measured = memory.measure_training(spec["stage"], getattr(cfg, spec["stage"]), shell, standin, spec["batch"],
                                           timed=spec.get("timed", False), resident=not spec.get("timed", False))
    return {"tracker": measured["peak"], "rss": measured["resident"], "bytes": measured["bytes"],
            "flops_measured": measured["flops"], "seconds_measured": measured["seconds"],
            "tokens": measured["tokens"]}


def predicted(spec: dict) -> dict:
    """The plan of the step ``spec`` names, made here as `harness run` and `harness estimate` make it."""
    cfg = load_config(spec["config"], spec["overrides"])
    standin = fit.standin_rows(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        shell = fit.model_shell(cfg, standin, Path(tmp) / "model")
        plan = memory.trace_training(spec["stage"], getattr(cfg, spec["stage"]), shell, standin,
                                     timed=spec.get("timed", False))
    return {"predicted": plan.peak(spec["batch"]), "flops_predicted": plan.flops(spec["batch"]),
            "seconds_predicted": plan.seconds_per_sample * spec["batch"]}


def measure(spec: dict) -> dict:
    """The plan (here) and the real step (in a fresh process) of ``spec``."""
    plan = predicted(spec)
    # in a process of its own: its resident memory is the step's alone, and the resident count changes how glibc
    # allocates for the rest of the process (stages/support/memory.py _glibc_counts_every_byte)
    done = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"measurement {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) | plan | {"spec": spec}


def checks() -> list[dict]:
    specs = [
        {"name": "tiny default sft (batch 32)", "config": "tiny", "overrides": [], "stage": "sft", "batch": 32},
        {"name": "tiny default dpo (batch 16)", "config": "tiny", "overrides": [], "stage": "dpo", "batch": 16},
        *({"name": f"SmolVLM-256M {stage} (batch 1, 2x2 grid, LoRA, fp32)", "config": PRESET, "stage": stage,
           "batch": 1, "overrides": ["model.source=random", "model.architecture=smolvlm-256m",
                                     "model.image_longest_edge=1024", *SYNTHETIC[:2], f"{stage}.precision=fp32"]}
          for stage in ("sft", "dpo")),
    ]
    out = []
    for spec in specs:
        start = time.perf_counter()
        result = measure(spec)
        result["wall_s"] = round(time.perf_counter() - start, 1)
        out.append(result)
        print(f"{spec['name']}: predicted {result['predicted'] / GIB:.3f} GiB, tracker {result['tracker'] / GIB:.3f},"
              f" RSS {result['rss'] / GIB:.3f}", flush=True)
    return out


def step_times() -> list[dict]:
    out = []
    for edge, grid in ((1024, "2x2"), (2048, "4x4")):
        spec = {"name": f"SmolVLM-256M sft step, batch 1, {grid} grid", "config": PRESET, "stage": "sft", "batch": 1,
                "timed": True, "overrides": ["model.source=random", "model.architecture=smolvlm-256m",
                                             f"model.image_longest_edge={edge}", *SYNTHETIC[:2], "sft.precision=fp32"]}
        result = measure(spec)
        out.append(result | {"grid": grid})
        print(f"{spec['name']}: measured {result['seconds_measured']:.1f} s, predicted "
              f"{result['seconds_predicted']:.1f} s", flush=True)
    return out


def verdict(cell: dict) -> str:
    if cell["fits"]:
        return "fits"
    return f"fit: {cell['fit_batch']}" if cell["fit_batch"] else "does not fit"


def error(predicted: float, actual: float) -> float:
    return predicted / actual - 1 if actual else float("nan")


def write(table: list[dict], checked: list[dict], timed: list[dict], command: str,
          table_from: dict | None = None) -> None:
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(),
               "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                            if ln.startswith("model name")), platform.processor())}
    record = {"benchmark": "memory plan", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip(), "machine": machine, "command": command,
              "table": table, "table_from": table_from, "checks": checked, "step_times": timed}
    (ROOT / "results" / "memory.json").write_text(json.dumps(record, indent=1, default=str))
    lines = ["# The memory plan: the model sizes users run, per device", "",
             f"`{command}` on {machine['cpus']} cores ({machine['cpu']}), {record['date']}, commit {record['commit']}"
             + (f"; the per-device table from its run of {table_from['date']}, commit {table_from['commit']}."
                if table_from else "."),
             "How the plan is made: `stages/support/memory.py` (each device stage's real trainer step, traced with "
             "real tensors at 1-2 layers under torch's MemTracker and FlopCounterMode, extrapolated in depth and "
             "batch); what fits: `stages/support/fit.py` (a device's memory less 0.6 GiB of CUDA context, x 0.92).",
             "", "## Predicted peak memory at the T4 preset's settings", "",
             "SmolVLM architectures with random weights (`model.source=random`), `configs/smolvlm-256m-t4.yaml`: "
             "fp16 mixed precision, LoRA r16 on q/k/v/o, sft batch 8 x 4 accumulated, dpo 4 x 8 with on-policy "
             "answers, eval batch 32 (lmms, 16 new tokens), images split into a 4x4 grid of tiles and a global "
             "view (longest edge 2048; the 2.2B: 384-pixel tiles, longest edge 1536). GB: GiB torch allocates at the "
             "step's peak; fit: the micro-batch (x accumulation) `resources.fit=auto` picks on that device.", ""]
    for architecture in ARCHITECTURES:
        rows = [r for r in table if r["architecture"] == architecture]
        lines += [f"**{architecture}** (traced in {rows[0]['traced_s']:.0f} s)", "",
                  "| stage | batch | step TFLOP | " + " | ".join(DEVICES) + " |",
                  "|---|---|---|" + "---|" * len(DEVICES)]
        for stage in STAGES:
            cells = [r for r in rows if r["stage"] == stage]
            first = cells[0]
            lines.append(f"| {stage} | {first['batch']} | {first['step_flops'] / 1e12:.0f} | "
                         + " | ".join(f"{c['peak_gib']:.1f} {verdict(c)}" for c in cells) + " |")
        lines.append("")
    if checked:
        lines += ["## The plan against real steps on this CPU", "",
                  "Each in a fresh process: the plan (traced at 1-2 layers, batch 1) against the same step with every "
                  "layer and the batch named, real tensors, fp32. Tracker: torch's MemTracker's peak (target 5 %). "
                  "RSS, counted without the tracker (target 15 %): the bytes of the tensors the step starts with "
                  "(the model's, the optimizer state, the batch) plus what the process's resident memory grew by "
                  "during the step (the kernel's high-water mark VmHWM, reset after an untraced step: what a first "
                  "step initialises once is not the step's). glibc returns every allocation above 128 KiB when freed "
                  "(M_MMAP_THRESHOLD) and writes every byte it allocates (M_PERTURB): Linux backs a page "
                  "only once it is written, and the tiny default's sft step allocates 13.6 MB a sample (the tracker "
                  "and torch's profiler agree) of which 7.0 MB get written; a GPU allocator holds them all.",
                  "",
                  "| step | predicted GiB | tracker GiB | error | RSS GiB | error | FLOPs error |",
                  "|---|---|---|---|---|---|---|"]
        for c in checked:
            lines.append(f"| {c['spec']['name']} | {c['predicted'] / GIB:.3f} | {c['tracker'] / GIB:.3f} | "
                         f"{100 * error(c['predicted'], c['tracker']):+.1f} % | {c['rss'] / GIB:.3f} | "
                         f"{100 * error(c['predicted'], c['rss']):+.1f} % | "
                         f"{100 * error(c['flops_predicted'], c['flops_measured']):+.2f} % |")
        lines.append("")
    if timed:
        lines += ["## SmolVLM-256M's CPU seconds per SFT step", "",
                  "A plain step (no tracker) at full depth, batch 1, LoRA, fp32, 2 threads, against the prediction "
                  "`harness estimate --device cpu` makes for this machine from the traced step (target: 25 %).", "",
                  "| grid | tokens | measured s | predicted s | error |", "|---|---|---|---|---|"]
        for t in timed:
            lines.append(f"| {t['grid']} | {t['tokens']} | {t['seconds_measured']:.1f} | {t['seconds_predicted']:.1f}"
                         f" | {100 * error(t['seconds_predicted'], t['seconds_measured']):+.1f} % |")
        lines.append("")
    (ROOT / "results" / "memory.md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-checks", action="store_true", help="the per-device table only")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one measurement, in its own process
    parser.add_argument("--table", type=Path, help="reuse the table of an earlier run (results/memory.json)")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_in_process(json.loads(args.measure)), default=str))
        return 0
    command = "benchmarks/memory.py" + (" --skip-checks" if args.skip_checks else "") + \
        (f" --table {args.table}" if args.table else "")
    earlier = json.loads(args.table.read_text()) if args.table else None
    table = earlier["table"] if earlier else plan_table()
    table_from = earlier and (earlier.get("table_from") or {"date": earlier["date"], "commit": earlier["commit"]})
    checked = [] if args.skip_checks else checks()
    timed = [] if args.skip_checks else step_times()
    write(table, checked, timed, command, table_from)
    print("wrote results/memory.md and results/memory.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
