"""Regenerate the committed reference results of the presets: results/reference/*.json + results/README.md.

    unshare --net sh -c 'ip link set lo up; exec .venv/bin/python benchmarks/reference_results.py'

Runs `sft`, `dpo` and `grpo` on the default preset (the stage cache shares data/model/sft between them) and
tabulates their metrics, so a newcomer can compare a rerun (`harness reproduce results/reference/sft.json`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rows() -> list[tuple[str, str]]:
    """(metric, label) for the results table: every registered task's scores, then the preference metrics."""
    from evals.registry import TASKS

    out = []
    for prefix, label in (("", ""), ("base_", "base "), ("prior_", "prior "), ("sft_", "SFT ckpt ")):
        out += [(f"eval/{prefix}{t.metric}", f"{label}{t.title}") for t in TASKS.values()]
    out += [(f"eval/{prefix}mean_accuracy", f"{label}mean") for prefix, label in (("", ""), ("base_", "base "))]
    return out + [("dpo/reward_margin_start", "DPO margin start"), ("dpo/reward_margin_end", "DPO margin end"),
                  ("dpo/reward_accuracy", "DPO reward acc"), ("grpo/reward_start", "GRPO reward start"),
                  ("grpo/reward_end", "GRPO reward end")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipelines", nargs="+", default=["sft", "dpo", "grpo"])
    ap.add_argument("--output-dir", default=str(ROOT / "runs" / "reference"))
    ap.add_argument("--config", default="tiny", help="the preset (a file with the same content, to pin it)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from harness.pipeline import run_pipeline
    from runtime.config import load_config

    out = ROOT / "results" / "reference"
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for pipeline in args.pipelines:
        result = run_pipeline(load_config(args.config), pipeline, args.output_dir)
        result.pop("run_dir", None)
        (out / f"{pipeline}.json").write_text(json.dumps(result, indent=2))
        results[pipeline] = result
    header = "| metric | " + " | ".join(results) + " |"
    lines = ["# Reference results (default preset `configs/tiny.yaml`, 2 CPU cores)", "",
             "Regenerate: `unshare --net sh -c 'ip link set lo up; exec .venv/bin/python "
             "benchmarks/reference_results.py'` — compare your rerun with "
             "`harness reproduce results/reference/<pipeline>.json`.", "", header,
             "|---|" + "---|" * len(results)]
    for key, label in rows():
        cells = [metric_cell(r["metrics"], key) for r in results.values()]
        if any(cells):
            lines.append(f"| {label} (`{key}`) | " + " | ".join(cells) + " |")
    for label, fn in (("stage wall s (computed)", lambda r: sum(s["wall_seconds"] for s in r["stages"])),
                      ("cost USD", lambda r: r["cost_usd"]), ("accelerator-hours", lambda r: r["accelerator_hours"]),
                      ("utilization", lambda r: r["utilization"])):
        lines.append(f"| {label} | " + " | ".join(f"{fn(r):.4g}" for r in results.values()) + " |")
    first = next(iter(results.values()))["manifest"]
    lines += ["", f"Machine: {first['hardware']['cpu']} ({first['hardware']['cpu_count']} cores); "
              f"torch {first['packages']['torch']}, transformers {first['packages']['transformers']}, "
              f"trl {first['packages']['trl']}; git {str(first['git']['sha'])[:10]}.", ""]
    (ROOT / "results" / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))


def metric_cell(metrics: dict, key: str) -> str:
    """``0.473 ± 0.031`` (half the 95 % interval, where recorded); empty when the run lacks the metric."""
    if key not in metrics:
        return ""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return f"{metrics[key]:.3f}" + (f" ± {(high - low) / 2:.3f}" if low is not None and high is not None else "")


if __name__ == "__main__":
    main()
