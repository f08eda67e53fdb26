"""vlmlab's performance benchmarks, one command: results/benchmarks.md + results/benchmarks.json.

    unshare --net sh -c 'ip link set lo up; exec .venv/bin/python benchmarks/run_all.py'
    ... benchmarks/run_all.py --only overhead,eval --reps 3

1. overhead    `harness run train` (data -> model -> sft, the default preset) vs benchmarks/bare_sft.py (the same
               steps as a bare TRL script): process wall time and time to the first optimizer step, alternating
               which goes first, median over --reps.
2. sweep       `harness sweep dpo-beta --trials 8` vs standalone `harness run dpo` of the same (shortened) DPO
               stage, both reusing the overhead run's cached data/model/sft: wall per trial / standalone wall.
3. grpo        `harness run grpo` on the default preset (cached sft): with sft, the utilization (busy/held from
               the cost accounting) of the training stages; DPO's from the recorded default-preset run.
4. eval        the eval stage's batched lm-eval model vs lm-eval's own `hf-multimodal` at batch size 1 on the same
               checkpoint and items: items/s and both scores.
5. throughput  samples/s and tokens/s of each training stage.
Each section prints its numbers as it finishes. Run it alone: two trainings on 2 cores slow each other 4-5x.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.cache import StageCache
from harness.report import stage_dir, stage_record

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EVAL_SPEED = ROOT / "benchmarks" / "eval_speed.py"
SWEEP_DPO = ["dpo.max_steps=40", "dpo.save_steps=40", "dpo.preference.size=256", "eval.limit=100"]  # ~1 minute a trial
STANDALONE_BETAS = (0.05, 0.2)  # not on the sweep's grid, so the standalone runs are not cache hits


def sh(argv: list[str], log: Path) -> float:
    """Run argv to completion (output to log); its wall seconds. Raises with the log's tail on failure."""
    start = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(argv)} failed (rc {rc}):\n{log.read_text()[-3000:]}")
    return time.time() - start


def newest_result(out: Path) -> dict:
    path = max(out.glob("*/result.json"), key=lambda p: p.stat().st_mtime)
    return {**json.loads(path.read_text()), "run_dir": str(path.parent)}


def last_json(log: Path) -> dict:
    """The JSON line a benchmark script prints last."""
    return json.loads(log.read_text().strip().splitlines()[-1])


def overhead_run_dir(work: Path) -> Path:
    """The first harness run of the overhead section: its data, model and SFT checkpoint feed later sections."""
    return Path(json.loads((work / "overhead.json").read_text())["reps"][0]["harness"]["run_dir"])


def overhead(work: Path, reps: int, extra: list[str]) -> dict:
    rows = []
    for rep in range(reps):
        out_h, out_b = work / f"harness{rep}", work / f"bare{rep}"
        order = ("harness", "bare") if rep % 2 == 0 else ("bare", "harness")
        timings = {}
        for which in order:
            launched = time.time()
            if which == "harness":
                wall = sh([str(BIN / "harness"), "run", "train", "pipelines.train=[data,model,sft]",
                           f"--output-dir={out_h}", f"tracking.uri=sqlite:///{out_h}/mlflow.db", *extra],
                          work / f"harness{rep}.log")
                result = newest_result(out_h)
                sft = stage_record(result, "sft")
                timings["harness"] = {
                    "wall": wall, "first_step": result["metrics"]["sft/first_step_unix"] - launched,
                    "sft_stage": sft["wall_seconds"], "busy": result["metrics"]["sft/step_seconds"],
                    "stages_sum": sum(s["wall_seconds"] for s in result["stages"]),
                    "samples_per_second": result["metrics"]["sft/train_samples_per_second"],
                    "utilization": sft["cost"]["cost/utilization"], "run_dir": result["run_dir"]}
            else:
                wall = sh([sys.executable, str(ROOT / "benchmarks" / "bare_sft.py"), f"--out={out_b}", *extra],
                          work / f"bare{rep}.log")
                line = last_json(work / f"bare{rep}.log")
                timings["bare"] = {"wall": wall, "first_step": line["first_step_unix"] - launched,
                                   "busy": line["busy_seconds"], "samples_per_second": line["train_samples_per_second"]}
        rows.append(timings)
        h, b = timings["harness"], timings["bare"]
        print(f"overhead rep {rep}: harness {h['wall']:.1f} s (first step {h['first_step']:.1f} s), bare "
              f"{b['wall']:.1f} s (first step {b['first_step']:.1f} s): ratio {h['wall'] / b['wall']:.3f}", flush=True)
    med = lambda f: statistics.median(f(r) for r in rows)  # noqa: E731
    return {
        "harness_overhead_ratio": med(lambda r: r["harness"]["wall"] / r["bare"]["wall"]),
        "time_to_first_step_ratio": med(lambda r: r["harness"]["first_step"] / r["bare"]["first_step"]),
        "harness_wall_seconds": med(lambda r: r["harness"]["wall"]),
        "bare_wall_seconds": med(lambda r: r["bare"]["wall"]),
        "harness_first_step_seconds": med(lambda r: r["harness"]["first_step"]),
        "bare_first_step_seconds": med(lambda r: r["bare"]["first_step"]),
        "harness_busy_seconds": med(lambda r: r["harness"]["busy"]),
        "bare_busy_seconds": med(lambda r: r["bare"]["busy"]),
        "harness_outside_stages_seconds": med(lambda r: r["harness"]["wall"] - r["harness"]["stages_sum"]),
        "sft_utilization": med(lambda r: r["harness"]["utilization"]),
        "sft_samples_per_second": med(lambda r: r["harness"]["samples_per_second"]),
        "reps": rows, "settings": "default preset, pipeline data -> model -> sft, 1 worker x 2 CPUs" +
        (f", overrides {' '.join(extra)}" if extra else ""),
        "command": "benchmarks/run_all.py --only overhead" + (f" --reps {reps}" if reps != 3 else ""),
    }


def forget(out: Path, *stages: str) -> None:
    """Drop these stages' entries from the stage cache under ``out``: a rerun of a section measures them again."""
    cache = StageCache(out / ".cache")
    for name in stages:
        cache.forget(name)


def sweep(work: Path, trials: int, extra: list[str]) -> dict:
    out = work / "harness0"  # holds the cached data/model/sft of the overhead run (same keys)
    forget(out, "dpo", "eval")  # left by an earlier run of this section
    common = [f"--output-dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", *SWEEP_DPO, *extra]
    standalone = []
    for beta in STANDALONE_BETAS:
        wall = sh([str(BIN / "harness"), "run", "dpo", *common, f"dpo.beta={beta}"], work / f"dpo_{beta}.log")
        result = newest_result(out)
        assert result["reused_stages"] == ["data", "model", "sft"], result["reused_stages"]
        standalone.append({"wall": wall, "dpo_stage": stage_record(result, "dpo")["wall_seconds"],
                           "eval_stage": stage_record(result, "eval")["wall_seconds"],
                           "utilization": stage_record(result, "dpo")["cost"]["cost/utilization"],
                           "samples_per_second": result["metrics"]["dpo/train_samples_per_second"]})
        print(f"standalone dpo beta={beta}: {wall:.1f} s (dpo stage {standalone[-1]['dpo_stage']:.1f} s, "
              f"eval {standalone[-1]['eval_stage']:.1f} s)", flush=True)
    wall = sh([str(BIN / "harness"), "sweep", "dpo-beta", f"--trials={trials}", *common], work / "sweep.log")
    per_trial = wall / trials
    single = statistics.median(s["wall"] for s in standalone)
    single_stages = statistics.median(s["dpo_stage"] + s["eval_stage"] for s in standalone)
    print(f"sweep of {trials}: {wall:.1f} s, {per_trial:.1f} s a trial vs standalone {single:.1f} s "
          f"(ratio {per_trial / single:.3f}; vs its dpo+eval stages alone {per_trial / single_stages:.3f})", flush=True)
    return {"sweep_per_trial_ratio": per_trial / single, "per_trial_vs_stages_ratio": per_trial / single_stages,
            "sweep_wall_seconds": wall, "trials": trials, "per_trial_seconds": per_trial,
            "standalone_wall_seconds": single, "standalone_dpo_plus_eval_seconds": single_stages,
            "standalone": standalone, "dpo_utilization": statistics.median(s["utilization"] for s in standalone),
            "dpo_samples_per_second": statistics.median(s["samples_per_second"] for s in standalone),
            "settings": f"dpo-beta grid of {trials}, {' '.join(SWEEP_DPO + extra)}, data/model/sft from the cache",
            "command": "benchmarks/run_all.py --only overhead,sweep"}


def data_tasks(run_dir: Path) -> list[str]:
    """The tasks a run's data stage wrote."""
    return sorted(p.parent.name for p in (run_dir / "data").glob("*/test.parquet"))


def eval_speed(work: Path, reps: int) -> dict:
    """The eval stage's lm-eval model (batched) vs stock hf-multimodal at batch size 1: same tasks and items."""
    run_dir = overhead_run_dir(work)
    result = json.loads((run_dir / "result.json").read_text())
    model_dir = str(stage_dir(stage_record(result, "sft"), run_dir) / "model")
    tasks = {k: {"test": str(run_dir / "data" / k / "test.parquet")} for k in data_tasks(run_dir)}
    rows = []
    for rep in range(reps):
        for which in ("vlmlab", "lm-eval-bs1") if rep % 2 == 0 else ("lm-eval-bs1", "vlmlab"):
            log = work / f"eval_{which}_{rep}.log"
            sh([sys.executable, str(EVAL_SPEED), which, model_dir, json.dumps(tasks)], log)
            rows.append({"which": which, **last_json(log)})
    ours = [r for r in rows if r["which"] == "vlmlab"]
    stock = [r for r in rows if r["which"] == "lm-eval-bs1"]
    ips = lambda rs: statistics.median(r["items_per_second"] for r in rs)  # noqa: E731
    out = {"eval_speedup_vs_lm_eval": ips(ours) / ips(stock), "vlmlab_items_per_second": ips(ours),
           "lm_eval_bs1_items_per_second": ips(stock), "vlmlab_scores": ours[0]["scores"],
           "lm_eval_bs1_scores": stock[0]["scores"], "identical_scores": ours[0]["scores"] == stock[0]["scores"],
           "items": ours[0]["items"], "batch_size": ours[0]["batch_size"], "reps": rows,
           "settings": "the overhead run's SFT checkpoint, both tasks' 300 test items each, greedy, 2 threads",
           "command": "benchmarks/run_all.py --only overhead,eval"}
    print(f"eval: {out['vlmlab_items_per_second']:.1f} items/s (batch {out['batch_size']}) vs "
          f"{out['lm_eval_bs1_items_per_second']:.1f} (hf-multimodal, batch 1): {out['eval_speedup_vs_lm_eval']:.2f}x, "
          f"scores {out['vlmlab_scores']} vs {out['lm_eval_bs1_scores']}", flush=True)
    return out


def tokens_per_sample(work: Path) -> float:
    """Mean tokens (image tokens included) of an SFT sample of the default preset, through the processor."""
    run_dir = overhead_run_dir(work)
    log = work / "tokens.log"
    sh([sys.executable, str(EVAL_SPEED), "tokens", str(run_dir / "model" / "model"),
        json.dumps({k: {"train": str(run_dir / "data" / k / "train.parquet")} for k in data_tasks(run_dir)})], log)
    return last_json(log)["tokens_per_sample"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="overhead,sweep,grpo,eval", help="comma-separated sections")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every harness run")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="vlmlab-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    commit = git_commit()
    print(f"benchmarks: commit {commit}, scratch in {work}", flush=True)
    sections = args.only.split(",")
    out_json = ROOT / "results" / "benchmarks.json"
    report = json.loads(out_json.read_text()) if out_json.exists() else {}
    if "overhead" in sections:
        report["overhead"] = overhead(work, args.reps, args.overrides)
        (work / "overhead.json").write_text(json.dumps(report["overhead"]))
    elif not (work / "overhead.json").exists():
        raise SystemExit("sweep/eval reuse the overhead section's run: include it, or pass its --work directory")
    if "sweep" in sections:
        report["sweep"] = sweep(work, args.trials, args.overrides)
    if "grpo" in sections:
        report["grpo"] = grpo_run(work, args.overrides)
    if "eval" in sections:
        report["eval"] = eval_speed(work, args.reps)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for section in sections:  # sections kept from an earlier --only run keep their own time
        if isinstance(report.get(section), dict):
            report[section].update(measured_at=stamp, commit=commit)
    report["throughput"] = throughput(report, tokens_per_sample(work))
    report["utilization"] = utilization(report)
    report["summary"] = {
        "harness_overhead_ratio": report.get("overhead", {}).get("harness_overhead_ratio"),
        "sweep_per_trial_ratio": report.get("sweep", {}).get("sweep_per_trial_ratio"),
        "min_train_utilization": report["utilization"]["min_train_utilization"],
        "eval_speedup_vs_lm_eval": report.get("eval", {}).get("eval_speedup_vs_lm_eval")}
    report["machine"] = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                         "python": platform.python_version(), "when": stamp}
    out_json.write_text(json.dumps(report, indent=1, default=str))
    write_markdown(report, ROOT / "results" / "benchmarks.md")
    print(json.dumps(report["summary"], indent=1))


def throughput(report: dict, tokens: float) -> dict:
    sft = report.get("overhead", {}).get("sft_samples_per_second")
    dpo = report.get("sweep", {}).get("dpo_samples_per_second")
    grpo = report.get("grpo", {}).get("samples_per_second")
    return {"tokens_per_sample": tokens,
            "sft": {"samples_per_second": sft, "tokens_per_second": sft and sft * tokens},
            "dpo": {"pairs_per_second": dpo, "tokens_per_second": dpo and dpo * 2 * tokens},
            "grpo": {"samples_per_second": grpo},
            "note": "DPO tokens count the chosen and the rejected sequence of each pair"}


def grpo_run(work: Path, extra: list[str]) -> dict:
    """`harness run grpo` on the default preset, its data/model/sft from the overhead run's cache."""
    out = work / "harness0"
    forget(out, "grpo")
    wall = sh([str(BIN / "harness"), "run", "grpo", f"--output-dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db",
               *extra], work / "grpo.log")
    result = newest_result(out)
    grpo = stage_record(result, "grpo")
    print(f"grpo (default preset): {wall:.1f} s, stage {grpo['wall_seconds']:.1f} s, utilization "
          f"{grpo['cost']['cost/utilization']:.3f}", flush=True)
    return {"wall_seconds": wall, "stage_seconds": grpo["wall_seconds"],
            "utilization": grpo["cost"]["cost/utilization"],
            "samples_per_second": result["metrics"]["grpo/train_samples_per_second"],
            "busy_seconds": result["metrics"]["grpo/step_seconds"]}


def utilization(report: dict) -> dict:
    """busy/held per training stage on the default preset (dpo: the recorded reference run)."""
    reference = json.loads((ROOT / "results" / "reference" / "dpo.json").read_text())
    per_stage = {"sft": report.get("overhead", {}).get("sft_utilization"),
                 "dpo": stage_record(reference, "dpo")["cost"]["cost/utilization"],
                 "grpo": report.get("grpo", {}).get("utilization")}
    known = [v for v in per_stage.values() if v is not None]
    return {"per_stage": per_stage, "min_train_utilization": min(known) if known else None,
            "dpo_shortened_sweep_runs": report.get("sweep", {}).get("dpo_utilization"),
            "settings": "default preset: sft from the overhead run, grpo from the grpo run; dpo from "
                        "results/reference/dpo.json (the recorded default-preset run, benchmarks/reference_results.py)"}


def _when(section: dict) -> str:
    """Sections kept from an earlier `--only` run say when, and on which commit, they were measured."""
    if not section.get("measured_at"):
        return ""
    commit = f" on commit {section['commit']}" if section.get("commit") else ""
    return f"Measured {section['measured_at']}{commit}: "


def git_commit() -> str:
    """The commit being measured; '+dirty' when tracked files outside results/ differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results") else "")


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _section(title: str, intro: list[str], header: tuple, rows: list[tuple]) -> list[str]:
    """A markdown section holding one table; nothing when there are no rows."""
    if not rows:
        return []
    return [title, "", *intro, "| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def write_markdown(report: dict, path: Path) -> None:
    """results/benchmarks.md: the targets, what was measured, and the settings and command of each."""
    s = report["summary"]
    o, sw, ev = report.get("overhead", {}), report.get("sweep", {}), report.get("eval", {})
    u, tp = report["utilization"], report["throughput"]
    lines = [
        "# vlmlab benchmarks", "",
        f"Last run {report['machine']['when']} on {report['machine']['cpus']} CPU cores "
        f"(`benchmarks/run_all.py`; JSON: `results/benchmarks.json`). Ratios are measured side by side in one run.", "",
        "| benchmark | target | measured |", "| --- | --- | --- |",
        f"| harness overhead (harness / bare TRL wall) | <= 1.10 | {_fmt(s['harness_overhead_ratio'])} |",
        f"| sweep wall per trial / standalone run | <= 1.2 | {_fmt(s['sweep_per_trial_ratio'])} |",
        f"| min training-stage utilization (busy/held) | >= 0.8 | {_fmt(s['min_train_utilization'])} |",
        f"| eval items/s vs lm-eval hf-multimodal bs 1 | >= 3x | {_fmt(s['eval_speedup_vs_lm_eval'], 2)} |", ""]
    if o:
        lines += ["## 1. Harness overhead", "",
                  _when(o) + o["settings"] + f"; median of {len(o['reps'])} repetitions.", "",
                  "| | harness | bare TRL script |", "| --- | --- | --- |",
                  f"| process wall (s) | {o['harness_wall_seconds']:.1f} | {o['bare_wall_seconds']:.1f} |",
                  f"| time to first step (s) | {o['harness_first_step_seconds']:.1f} | "
                  f"{o['bare_first_step_seconds']:.1f} |",
                  f"| inside optimizer steps (s) | {o['harness_busy_seconds']:.1f} | {o['bare_busy_seconds']:.1f} |",
                  "", f"Wall ratio {o['harness_overhead_ratio']:.3f}, time-to-first-step ratio "
                  f"{o['time_to_first_step_ratio']:.2f}; the harness spent {o['harness_outside_stages_seconds']:.1f} s "
                  "outside its stages (imports, Ray start, MLflow, result/manifest).", ""]
    if sw:
        lines += ["## 2. Sweep efficiency", "", _when(sw) + sw["settings"] + ".", "",
                  f"Sweep of {sw['trials']} trials: {sw['sweep_wall_seconds']:.1f} s = {sw['per_trial_seconds']:.1f} s "
                  "a trial; one standalone `harness run dpo` of the same settings: "
                  f"{sw['standalone_wall_seconds']:.1f} s "
                  f"(its dpo + eval stages {sw['standalone_dpo_plus_eval_seconds']:.1f} s). Ratio "
                  f"{sw['sweep_per_trial_ratio']:.3f} (vs the stages alone {sw['per_trial_vs_stages_ratio']:.3f}).", ""]
    lines += ["## 3. Utilization (busy / held)", "", u["settings"] + ".", "",
              "| stage | utilization |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in u["per_stage"].items()] + [""]
    if ev:
        lines += ["## 4. Eval throughput", "", _when(ev) + ev["settings"] + ".", "",
                  "| | items/s | scores |", "| --- | --- | --- |",
                  f"| eval stage (batch {ev['batch_size']}) | {ev['vlmlab_items_per_second']:.1f} | "
                  f"{ev['vlmlab_scores']} |",
                  f"| lm-eval hf-multimodal, batch 1 | {ev['lm_eval_bs1_items_per_second']:.1f} | "
                  f"{ev['lm_eval_bs1_scores']} |", "",
                  f"Speed-up {ev['eval_speedup_vs_lm_eval']:.2f}x; identical scores: {ev['identical_scores']}.", ""]
    lines += ["## 5. Training throughput (default preset, 2 CPU cores)", "",
              f"Tokens per SFT sample (image tokens included): {tp['tokens_per_sample']:.1f}. {tp['note']}.", "",
              "| stage | samples/s | tokens/s |", "| --- | --- | --- |",
              f"| sft | {_fmt(tp['sft']['samples_per_second'], 1)} | {_fmt(tp['sft']['tokens_per_second'], 0)} |",
              f"| dpo (pairs) | {_fmt(tp['dpo']['pairs_per_second'], 1)} | {_fmt(tp['dpo']['tokens_per_second'], 0)} |",
              f"| grpo | {_fmt(tp['grpo']['samples_per_second'], 1)} | n/a |", ""]
    gpu_rows = [(g["gpu"], g["precision"], g["batch_size"], f"{g['samples_per_second']:.1f}",
                 f"{g['tokens_per_second']:.0f}", _fmt(g["mfu"]), f"{g['max_memory_gib']:.1f}")
                for g in map(_load, sorted((ROOT / "results" / "gpu").glob("gpu_*.json")))]
    lines += _section("## GPU: SmolVLM-256M-sized model (`benchmarks/gpu_throughput.py`)", [],
                      ("GPU", "precision", "batch", "samples/s", "tokens/s", "MFU", "memory (GiB)"), gpu_rows)
    tiny_rows = [(f.stem.rsplit("_", 1)[1], g["steps"], f"{g['busy_seconds']:.1f}",
                  f"{g['train_samples_per_second']:.0f}", f"{g['train_loss']:.3f}")
                 for f in sorted((ROOT / "results" / "gpu").glob("tiny_sft_*.json")) for g in [_load(f)]]
    lines += _section("## GPU: the default preset's SFT through TRL (`bare_sft.py resources.use_gpu=true`)",
                      ["See results/gpu/README.md for the machine and command.", ""],
                      ("precision", "steps", "inside steps (s)", "samples/s", "train loss"), tiny_rows)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
