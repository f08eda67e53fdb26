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
ROWS = [("eval/vqa_accuracy", "VQA acc"), ("eval/chartqa_relaxed_accuracy", "ChartQA relaxed"),
        ("eval/base_vqa_accuracy", "base VQA"), ("eval/base_chartqa_relaxed_accuracy", "base ChartQA"),
        ("eval/prior_vqa_accuracy", "prior VQA"), ("eval/prior_chartqa_relaxed_accuracy", "prior ChartQA"),
        ("eval/sft_vqa_accuracy", "SFT ckpt VQA"), ("eval/sft_chartqa_relaxed_accuracy", "SFT ckpt ChartQA"),
        ("dpo/reward_margin_start", "DPO margin start"), ("dpo/reward_margin_end", "DPO margin end"),
        ("dpo/reward_accuracy", "DPO reward acc"), ("grpo/reward_start", "GRPO reward start"),
        ("grpo/reward_end", "GRPO reward end")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipelines", nargs="+", default=["sft", "dpo", "grpo"])
    ap.add_argument("--output-dir", default=str(ROOT / "runs" / "reference"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from harness.config import load_config
    from harness.pipeline import run_pipeline

    out = ROOT / "results" / "reference"
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for pipeline in args.pipelines:
        result = run_pipeline(load_config("tiny"), pipeline, args.output_dir)
        result.pop("run_dir", None)
        (out / f"{pipeline}.json").write_text(json.dumps(result, indent=2))
        results[pipeline] = result
    header = "| metric | " + " | ".join(results) + " |"
    lines = ["# Reference results (default preset `configs/tiny.yaml`, 2 CPU cores)", "",
             "Regenerate: `unshare --net sh -c 'ip link set lo up; exec .venv/bin/python "
             "benchmarks/reference_results.py'` — compare your rerun with "
             "`harness reproduce results/reference/<pipeline>.json`.", "", header,
             "|---|" + "---|" * len(results)]
    for key, label in ROWS:
        cells = [f"{r['metrics'][key]:.3f}" if key in r["metrics"] else "" for r in results.values()]
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


if __name__ == "__main__":
    main()
