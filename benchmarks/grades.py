"""GradES benchmark: the same SFT stage with and without GradES on the default preset, several seeds.

The baseline arm runs GradES in observe-only mode (tau = 0: nothing can freeze) so it records every matrix's
L1 change curve; tau per group is then calibrated from the first baseline: the median over the group's
matrices of the change measured at --calibrate-at (fraction of training). The GradES arm uses those taus.

    .venv/bin/python benchmarks/grades.py                      # 3 seeds, writes results/grades.{md,json}
    .venv/bin/python benchmarks/grades.py --seeds 0 --set sft.max_steps=300

Run it inside a loopback-only namespace like the tests (Ray listens on all interfaces):
    unshare --net sh -c 'ip link set lo up; exec .venv/bin/python benchmarks/grades.py'
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["sft.grades.enabled=true", "sft.grades.alpha=0.28", "sft.grades.compute_interval=20"]
OBSERVE = ["sft.grades.vision_tau=0", "sft.grades.language_tau=0"]  # records curves, never freezes


def calibrate(run_dir: str, at: float, max_steps: int) -> dict[str, float]:
    """tau per group: median change of the group's matrices at the check nearest ``at`` x max_steps."""
    history = json.loads((Path(run_dir) / "sft" / "grades_history.json").read_text())
    target = at * max_steps
    taus = {}
    for group in ("vision", "language"):
        values = []
        for entry in history.values():
            if entry["group"] == group and entry["changes"]:
                step, change = min(entry["changes"], key=lambda sc: abs(sc[0] - target))
                values.append(change)
        taus[group] = float(f"{statistics.median(values):.4g}")
    return taus


def one(seed: int, arm: list[str], extra: list[str], out: Path) -> dict:
    from harness.config import load_config
    from harness.pipeline import run_pipeline

    overrides = [f"seed={seed}", *COMMON, *arm, *extra]
    result = run_pipeline(load_config(None, overrides), "sft", str(out))
    sft = next(s for s in result["stages"] if s["name"] == "sft")
    m = result["metrics"]
    return {"seed": seed, "arm": arm, "sft_wall_seconds": sft["wall_seconds"],
            "steps": m["sft/steps"], "step_seconds": m["sft/step_seconds"],
            "backward_seconds": m["sft/backward_seconds"],
            "frozen_fraction": m.get("sft/grades/frozen_fraction", 0.0),
            "vqa_accuracy": m["eval/vqa_accuracy"], "chartqa_relaxed_accuracy": m["eval/chartqa_relaxed_accuracy"],
            "mean_accuracy": m["eval/mean_accuracy"], "run_dir": result["run_dir"]}


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="extra", nargs="*", default=[], help="extra key=value overrides for both arms")
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--calibrate-at", type=float, default=0.5, help="fraction of training for tau calibration")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    start = time.time()
    from harness.config import load_config

    max_steps = load_config(None, args.extra).sft.max_steps
    off, on, taus = [], [], None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # the two arms side by side per seed, same machine state
            off.append(one(seed, OBSERVE, args.extra, Path(tmp)))
            if taus is None:
                taus = calibrate(off[0]["run_dir"], args.calibrate_at, max_steps)
                print(f"calibrated tau: {taus}", flush=True)
            grades_arm = [f"sft.grades.vision_tau={taus['vision']}", f"sft.grades.language_tau={taus['language']}"]
            on.append(one(seed, grades_arm, args.extra, Path(tmp)))
            print(json.dumps(off[-1]), json.dumps(on[-1]), sep="\n", flush=True)
    rows = off + on
    speedups = [a["sft_wall_seconds"] / b["sft_wall_seconds"] for a, b in zip(off, on, strict=False)]
    backward = [a["backward_seconds"] / b["backward_seconds"] for a, b in zip(off, on, strict=False)]
    deltas = [b["mean_accuracy"] - a["mean_accuracy"] for a, b in zip(off, on, strict=False)]
    command = "unshare --net sh -c 'ip link set lo up; exec .venv/bin/python benchmarks/grades.py " + \
        " ".join(sys.argv[1:]) + "'"
    settings = COMMON + [f"sft.grades.vision_tau={taus['vision']}", f"sft.grades.language_tau={taus['language']}"]
    summary = {"command": command, "grades_settings": settings, "calibrate_at": args.calibrate_at,
               "extra": args.extra, "seeds": args.seeds,
               "speedup_sft_wall": statistics.mean(speedups), "speedup_backward": statistics.mean(backward),
               "accuracy_delta_mean": statistics.mean(deltas),
               "accuracy_delta_sd": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
               "runs": [{k: v for k, v in r.items() if k != "run_dir"} for r in rows],
               "total_seconds": time.time() - start}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grades.json").write_text(json.dumps(summary, indent=2))
    lines = [
        "# GradES benchmark (default preset, SFT stage)", "", f"Command: `{command}`", "",
        f"GradES settings: `{' '.join(settings)}` (tau calibrated from the first baseline's curves at "
        f"{args.calibrate_at:.0%} of training; baseline = GradES observing with tau 0, nothing frozen)", "",
        "| arm | SFT wall s | optimizer steps | step s | backward s | frozen | VQA acc | ChartQA relaxed | mean acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in (("baseline", off), ("GradES", on)):
        lines.append(f"| {name} | {mean_sd([r['sft_wall_seconds'] for r in arm])} | "
                     f"{mean_sd([r['steps'] for r in arm])} | {mean_sd([r['step_seconds'] for r in arm])} | "
                     f"{mean_sd([r['backward_seconds'] for r in arm])} | "
                     f"{mean_sd([r['frozen_fraction'] for r in arm])} | "
                     f"{mean_sd([r['vqa_accuracy'] for r in arm])} | "
                     f"{mean_sd([r['chartqa_relaxed_accuracy'] for r in arm])} | "
                     f"{mean_sd([r['mean_accuracy'] for r in arm])} |")
    lines += ["", f"Speed-up of the SFT stage (baseline wall / GradES wall, per seed, mean): "
              f"**{summary['speedup_sft_wall']:.2f}x**; backward time: {summary['speedup_backward']:.2f}x.",
              f"Accuracy delta (GradES - baseline, mean accuracy): {mean_sd(deltas)} over seeds {args.seeds}.", ""]
    (out / "grades.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
