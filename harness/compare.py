"""`harness compare`: is run B better than run A on the items both scored, and what did the difference cost?

The leaderboard's "tie when the 95 % intervals overlap" ignores that two runs answered the same items; a paired
analysis is sharper (lmms-eval 0.6 added paired tests and power analysis for this reason). Per task:

* the paired difference of the means (B - A) over the items both runs scored, with a paired bootstrap 95 %
  interval (scipy.stats.bootstrap, paired=True, percentile);
* a two-sided p-value: McNemar's exact test (a binomial test on the discordant pairs) when every score is 0 or 1,
  else a paired permutation test (scipy.stats.permutation_test, scores swapped within pairs);
* the smallest difference this many items detect at 80 % power, two-sided alpha 0.05, from the spread of the paired
  differences: (z_0.975 + z_0.8) x sd(d) / sqrt(n);
* the cost and accelerator-hour difference of making each model.

The means are over items: for ChartQA, whose reported metric is the mean of its two subsets' means, they differ
from that metric where the subsets differ in size. Items are paired by their place in the eval stage's predictions
file (the driver writes them in doc_id order, and a task's doc_ids are 0..n-1), and a pair whose questions differ
stops the comparison: the runs scored different data.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from rich.table import Table
from scipy import stats

from evals.registry import TASKS
from harness import report as rep
from runtime.errors import UserError
from runtime.records import read_result

RESAMPLES = 9999  # scipy's default for both bootstrap and permutation tests
POWER, ALPHA = 0.8, 0.05
MAX_LINE_BYTES = 2 ** 20


class Prediction(BaseModel):
    """One line of an eval stage's predictions_<checkpoint>_<task>.jsonl (stages/eval.write_predictions)."""
    model_config = ConfigDict(extra="allow")
    question: str
    prediction: str


@dataclass
class Side:
    """One side of a comparison: a run's scored checkpoint."""
    name: str  # as the user wrote it
    run: rep.Run
    label: str  # the checkpoint (base, sft, dpo, ...)
    eval_dir: Path

    def predictions(self, task: str) -> Path:
        return predictions_file(self.eval_dir, self.label, task)

    def cost(self) -> tuple[float, float]:
        """(USD, accelerator-hours) of making this checkpoint's model: the run's stages up to and including the one
        that trained it (the model stage for `base`), scoring left out."""
        stage = "model" if self.label == "base" else self.label
        usd = hours = 0.0
        for record in self.run.result["stages"]:
            if record["name"] != "eval":
                usd, hours = usd + record["cost_usd"], hours + record["accelerator_hours"]
            if record["name"] == stage:
                break
        return usd, hours


def predictions_file(eval_dir: Path, label: str, task: str) -> Path:
    """Where an eval stage wrote checkpoint ``label``'s predictions on ``task`` (stages/eval.write_predictions)."""
    return eval_dir / f"predictions_{label}_{task}.jsonl"


def scored_checkpoints(result: dict, run_dir: Path) -> tuple[list[str], Path]:
    """The checkpoints a run's eval stage scored (the last is the final model) and the directory of its predictions;
    a UserError where the run has no eval stage or it recorded none."""
    record = next((s for s in result["stages"] if s["name"] == "eval"), None)
    if record is None:
        raise UserError(f"{run_dir}: its pipeline has no eval stage, so it scored no items; compare runs of a pipeline "
                        "that ends in eval")
    scored = record["outputs"].get("scored")
    if not isinstance(scored, list) or not scored or not all(isinstance(s, str) for s in scored):
        raise UserError(f"{run_dir / 'result.json'}: its eval stage lists no scored checkpoints "
                        "(outputs.scored); rerun the run's eval stage")
    return scored, rep.stage_dir(record, run_dir)


def side(target: str, tracking_uri: str | None, experiment: str | None, output_dir: str) -> Side:
    """``RUN`` (its final model) or ``RUN@CHECKPOINT`` (e.g. runs/X@sft: the SFT model a dpo run also scored)."""
    where, _, label = target.rpartition("@") if "@" in target else (target, "", "")
    run = rep.resolve(where, tracking_uri, experiment, output_dir)
    scored, eval_dir = scored_checkpoints(run.result, run.run_dir)
    label = label or scored[-1]
    if label not in scored:
        raise UserError(f"{target}: the run scored no checkpoint '{label}'; it scored {', '.join(scored)} "
                        f"(write {where}@{scored[0]})")
    return Side(target, run, label, eval_dir)


def read_scores(path: Path, task: str) -> tuple[list[str], list[float]]:
    """(questions, scores) of a predictions file, each line checked; a UserError names the file and line."""
    metric = TASKS[task].metric
    fix = "rerun the run's eval stage (delete its eval directory)"
    questions, scores = [], []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if len(raw) > MAX_LINE_BYTES:
                    raise UserError(f"{path}, line {number}: longer than {MAX_LINE_BYTES} bytes; {fix}")
                try:
                    data = json.loads(raw)
                    line = Prediction.model_validate(data)
                    score = data[metric]
                except (ValueError, ValidationError, TypeError, RecursionError):
                    raise UserError(f"{path}, line {number}: not a scored prediction (JSON with question, "
                                    f"prediction and {metric}); {fix}") from None
                except KeyError:
                    raise UserError(f"{path}, line {number}: no '{metric}' score; {fix}") from None
                if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
                    raise UserError(f"{path}, line {number}: {metric} is {str(score)[:40]!r}, not a score in "
                                    f"[0, 1]; {fix}")
                questions.append(line.question)
                scores.append(float(score))
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc}); {fix}") from None
    return questions, scores


def _mean_difference(u, v, axis=-1):
    """B - A over paired samples: the statistic of the bootstrap and of the permutation test (vectorized)."""
    return np.mean(v - u, axis=axis)


def paired_stats(a: list[float], b: list[float], seed: int = 0) -> dict:
    """The paired comparison of scores ``a`` and ``b`` (same items, same order): means, difference B - A, its 95 %
    interval, the p-value and its test, and the detectable difference at 80 % power."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = y - x
    n = len(d)
    out = {"items": n, "a": float(x.mean()), "b": float(y.mean()), "difference": float(d.mean())}
    binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    if n < 2 or np.ptp(d) == 0:  # no spread: every resample gives the same difference
        out["ci_low"] = out["ci_high"] = out["difference"]
    else:
        boot = stats.bootstrap((x, y), _mean_difference, paired=True, vectorized=True, n_resamples=RESAMPLES,
                               method="percentile", rng=np.random.default_rng(seed))
        out["ci_low"], out["ci_high"] = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    if binary:
        only_a, only_b = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
        out["test"] = "McNemar exact"
        out["discordant"] = [only_a, only_b]
        out["p_value"] = 1.0 if only_a + only_b == 0 else float(stats.binomtest(only_b, only_a + only_b).pvalue)
    else:
        out["test"] = "paired permutation"
        if np.all(d == 0):
            out["p_value"] = 1.0
        else:
            perm = stats.permutation_test((x, y), _mean_difference, permutation_type="samples", vectorized=True,
                                          n_resamples=RESAMPLES, rng=np.random.default_rng(seed))
            out["p_value"] = float(perm.pvalue)
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    z = stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER)
    out["detectable"] = float(z * sd / math.sqrt(n)) if sd > 0 else None
    return out


def compare(a: Side, b: Side, tasks: list[str] | None = None, seed: int = 0) -> dict:
    """Per task both sides scored: paired_stats on their common items; with each side's cost."""
    have = [t for t in TASKS if a.predictions(t).is_file() and b.predictions(t).is_file()]
    if tasks:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise UserError(f"--tasks: no task {', '.join(map(repr, unknown))}; tasks are {', '.join(TASKS)}")
        missing = [t for t in tasks if t not in have]
        if missing:
            raise UserError(f"--tasks: {', '.join(missing)} not scored by both runs; both scored "
                            f"{', '.join(have) or 'no common task'}")
        have = [t for t in have if t in tasks]
    if not have:
        raise UserError(f"{a.name} and {b.name} scored no task in common; compare runs of the same tasks")
    rows = {}
    for task in have:
        qa, sa = read_scores(a.predictions(task), task)
        qb, sb = read_scores(b.predictions(task), task)
        n = min(len(sa), len(sb))
        differ = next((i for i in range(n) if qa[i] != qb[i]), None)
        if differ is not None:
            raise UserError(f"{task}: item {differ} differs between the runs ({a.predictions(task)} asks "
                            f"{qa[differ][:60]!r}, {b.predictions(task)} asks {qb[differ][:60]!r}): they scored "
                            "different data; compare runs made from the same data settings")
        if n == 0:
            raise UserError(f"{task}: no item scored by both runs ({a.predictions(task)} or "
                            f"{b.predictions(task)} is empty)")
        rows[task] = {"metric": TASKS[task].metric, **paired_stats(sa[:n], sb[:n], seed)}
    (usd_a, hours_a), (usd_b, hours_b) = a.cost(), b.cost()
    return {"a": {"name": a.name, "run": str(a.run.run_dir), "checkpoint": a.label, "cost_usd": usd_a,
                  "accelerator_hours": hours_a},
            "b": {"name": b.name, "run": str(b.run.run_dir), "checkpoint": b.label, "cost_usd": usd_b,
                  "accelerator_hours": hours_b},
            "tasks": rows, "cost_usd_difference": usd_b - usd_a, "accelerator_hours_difference": hours_b - hours_a}


def final_scores(run_dir: Path) -> dict[str, tuple[list[str], list[float]]]:
    """Per task, the (questions, scores) of the final checkpoint a run's eval stage scored, read from its run
    directory alone (no MLflow); a UserError where they are not there to read."""
    scored, eval_dir = scored_checkpoints(read_result(run_dir / "result.json"), run_dir)
    files = {t: predictions_file(eval_dir, scored[-1], t) for t in TASKS}
    return {t: read_scores(path, t) for t, path in files.items() if path.is_file()}


def paired_p(a: dict, b: dict, tasks: list[str], seed: int = 0) -> float | None:
    """The p-value of B - A in the mean over ``tasks`` of each task's item mean, items paired (``a``, ``b``: what
    final_scores returns): a single task's own test (paired_stats), else a paired permutation test over every task's
    items at once. None where a task has no pair, or the runs asked different questions."""
    x, y, groups = [], [], []
    for task in tasks:
        if task not in a or task not in b:
            return None
        (qa, sa), (qb, sb) = a[task], b[task]
        n = min(len(sa), len(sb))
        if n == 0 or qa[:n] != qb[:n]:
            return None
        x.append(sa[:n])
        y.append(sb[:n])
        groups.append(n)
    if len(tasks) == 1:
        return paired_stats(x[0], y[0], seed)["p_value"]
    ends = np.cumsum(groups)[:-1]
    u, v = np.concatenate(x), np.concatenate(y)
    if np.all(u == v):
        return 1.0

    def mean_of_task_means(first, second, axis=-1):
        return np.mean([part.mean(axis=axis) for part in np.split(second - first, ends, axis=axis)], axis=0)

    return float(stats.permutation_test((u, v), mean_of_task_means, permutation_type="samples", vectorized=True,
                                        n_resamples=RESAMPLES, rng=np.random.default_rng(seed)).pvalue)


def verdict(row: dict) -> str:
    if row["p_value"] >= ALPHA:
        return "no detectable difference"
    return "B better" if row["difference"] > 0 else "A better"


def table(result: dict) -> Table:
    """The comparison as a rich table, one row per task (the test of each p-value in the footnote)."""
    a, b = result["a"], result["b"]
    out = Table(title=f"A = {a['name']} ({a['checkpoint']}), B = {b['name']} ({b['checkpoint']})",
                title_justify="left")
    for col in ("task", "items", "A", "B", "B - A [95% CI]", "p", "detects", "verdict"):
        out.add_column(col, justify="left" if col in ("task", "verdict") else "right")
    for task, r in result["tasks"].items():
        mark = "" if r["test"] == "McNemar exact" else "*"
        detects = "-" if r["detectable"] is None else f"{r['detectable']:.3f}"
        out.add_row(task, str(r["items"]), f"{r['a']:.3f}", f"{r['b']:.3f}",
                    f"{r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]", f"{r['p_value']:.3g}{mark}",
                    detects, verdict(r))
    return out


LEGEND = ("p: McNemar's exact test (0/1 scores; * a paired permutation test for graded scores). detects: the smallest "
          "|B - A| these items show with 80 % power (two-sided, alpha 0.05); a smaller true difference is likely to "
          "read as no detectable difference.")


def cost_line(result: dict) -> str:
    a, b = result["a"], result["b"]
    return (f"cost to make each model: A ${a['cost_usd']:.4f} ({a['accelerator_hours']:.4f} accelerator-h), "
            f"B ${b['cost_usd']:.4f} ({b['accelerator_hours']:.4f} accelerator-h); B - A: "
            f"${result['cost_usd_difference']:+.4f}, {result['accelerator_hours_difference']:+.4f} accelerator-h")
