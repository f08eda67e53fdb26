"""Scoring while training runs (eval.while_training): the pipeline's wall time with it on and off, on a local
multi-node Ray cluster: results/eval_scale.md + results/eval_scale.json.

    unshare --net sh -c 'ip link set lo up; exec .venv/bin/python benchmarks/eval_scale.py'
    ... benchmarks/eval_scale.py --pipeline sft --set sft.max_steps=50      (a shorter run, same comparison)

The cluster is tests/helpers.py's local_cluster: a head with nothing schedulable and two worker nodes of one CPU each
(on 2 cores, one core per node: what a second machine gives, no more). Training takes one worker node
(resources.workers=1, cpus_per_worker=1); the other is the spare room eval.while_training=on scores on. Each run has
an output directory (and so a stage and item cache) of its own: both compute every stage. The runs go one after the
other, ``on`` first; every eval/ metric of the two must be equal (else this script fails).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the cluster the tests start (one definition of it)
from helpers import local_cluster, loopback_only  # noqa: E402

BIN = Path(sys.executable).parent


def run(pipeline: str, mode: str, out: Path, cluster: dict, extra: list[str]) -> dict:
    """`harness run <pipeline>` on the cluster with eval.while_training=<mode>: its result, process wall and stages."""
    argv = [str(BIN / "harness"), "run", pipeline, f"--output-dir={out}", "resources.workers=1",
            "resources.cpus_per_worker=1", f"tracking.uri={cluster['tracking']}", f"eval.while_training={mode}",
            *extra]
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"]}
    start = time.time()
    with open(out.parent / f"{mode}.log", "w") as log:
        rc = subprocess.run(argv, cwd=out.parent, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - start
    if rc != 0:
        raise SystemExit(f"{' '.join(argv)} failed (rc {rc}):\n{(out.parent / f'{mode}.log').read_text()[-3000:]}")
    (path,) = out.glob("*/result.json")
    result = json.loads(path.read_text())
    stages = {s["name"]: s for s in result["stages"]}
    evaluation = stages.get("eval", {})
    return {"mode": mode, "process_wall_s": round(wall, 1), "pipeline_wall_s": round(result["wall_seconds"], 1),
            "stage_wall_s": {k: round(s["wall_seconds"], 1) for k, s in stages.items()},
            "accelerator_hours": result["accelerator_hours"], "cost_usd": result["cost_usd"],
            "while_training": evaluation.get("outputs", {}).get("while_training", []),
            "metrics": {k: v for k, v in result["metrics"].items() if k.startswith("eval/")}}


def markdown(runs: dict, args, command: str) -> str:
    on, off = runs["on"], runs["off"]
    lines = ["# Scoring while training runs: pipeline wall time, eval.while_training on vs off", "",
             f"Measured {time.strftime('%Y-%m-%d')} with `{command}`: "
             f"`harness run {args.pipeline}` at the default's step counts"
             + (f" with {' '.join(args.set)}" if args.set else "") + ", on a local multi-node Ray cluster on this "
             f"machine ({os.cpu_count()} cores): a head with nothing schedulable and two worker nodes of one CPU "
             "each. Training takes one node (resources.workers=1, cpus_per_worker=1); with `on` the eval shards "
             "score each finished model on the other node while the next stage trains. One run each, `on` first; "
             "each its own output directory and caches.", "",
             "| | on | off | on / off |", "|---|---:|---:|---:|"]
    for label, key in (("pipeline wall (s, sum of stages)", "pipeline_wall_s"), ("process wall (s)", "process_wall_s"),
                       ("accelerator-hours", "accelerator_hours"), ("cost (USD)", "cost_usd")):
        a, b = on[key], off[key]
        lines.append(f"| {label} | {a:.4g} | {b:.4g} | {a / b:.3f} |")
    for stage in off["stage_wall_s"]:
        a, b = on["stage_wall_s"][stage], off["stage_wall_s"][stage]
        lines.append(f"| {stage} stage wall (s) | {a:.1f} | {b:.1f} | {a / b:.3f} |")
    lines += ["", "Scored while training (`on`; seconds from the training stage's start):", "",
              "| checkpoint | while | scoring ended (s) | training ended (s) |", "|---|---|---:|---:|"]
    lines += [f"| {e['checkpoint']} | {e['during']} | {e['ended_s']:.1f} | {e['training_ended_s'] or 0:.1f} |"
              for e in on["while_training"]]
    mean = off["metrics"].get("eval/mean_accuracy")
    training = sum(off["stage_wall_s"].get(s, 0) for s in ("sft", "dpo", "grpo", "align"))
    lines += ["", f"Every eval/ metric of the two runs is equal ({len(off['metrics'])} metrics; final model's "
              f"mean accuracy {mean:.3f}).", "",
              f"Accelerator-hours do not drop (on / off: {on['accelerator_hours'] / off['accelerator_hours']:.3f}): "
              "the same scoring runs, and each model scored early holds its worker from its own start (process, "
              "model load, lm-eval's task setup), where the eval stage's one hold shares a start among its models. "
              "The wall time drops by the scoring that moved off the critical path: "
              f"{off['pipeline_wall_s'] - on['pipeline_wall_s']:.0f} s here, where training (1 core per node) is "
              f"{training / off['pipeline_wall_s']:.0%} of the pipeline. The bill drops only where the spare device "
              "is paid for anyway (a node of a cluster kept for the run).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="dpo")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for both runs (key=value)")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    if not loopback_only():
        raise SystemExit("run it in a loopback-only network namespace (see the docstring): the cluster's servers "
                         "and Ray listen on loopback")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: the cluster it started goes too
    command = " ".join(["benchmarks/eval_scale.py", *sys.argv[1:]])
    work = Path(tempfile.mkdtemp(prefix="eval-scale-"))
    runs = {}
    with local_cluster((1, 1)) as cluster:
        for mode in ("on", "off"):
            (work / mode).mkdir()
            runs[mode] = run(args.pipeline, mode, work / mode / "runs", cluster, args.set)
            print(json.dumps({k: v for k, v in runs[mode].items() if k != "metrics"}), flush=True)
    if runs["on"]["metrics"] != runs["off"]["metrics"]:
        differ = sorted(k for k in runs["off"]["metrics"] if runs["on"]["metrics"].get(k) != runs["off"]["metrics"][k])
        raise SystemExit(f"eval.while_training=on changed {len(differ)} metric(s): {differ[:10]} (runs in {work})")
    if not runs["on"]["while_training"]:
        raise SystemExit(f"nothing was scored while training ran (runs in {work})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval_scale.json").write_text(json.dumps({"command": command, "runs": runs}, indent=1))
    (args.out / "eval_scale.md").write_text(markdown(runs, args, "unshare --net sh -c 'ip link set lo up; exec "
                                                                    f".venv/bin/python {command}'"))
    print((args.out / "eval_scale.md").read_text())


if __name__ == "__main__":
    main()
