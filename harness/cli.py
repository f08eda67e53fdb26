"""`harness`: run pipelines, validate configs, print the environment."""
from __future__ import annotations

import errno
import json
import os
import signal
import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from evals.registry import TASKS
from harness.errors import UserError
from harness.estimate import DEFAULT_STEPS
from harness.secrets import RedactingStream, redact_text

try:  # typer 0.29 carries its own click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import NoArgsIsHelpError, UsageError

console = Console()
err = Console(stderr=True, soft_wrap=True)  # messages stay on one line: greppable in logs

CONFIG_HELP = "Preset name in configs/ (default: tiny) or a YAML file."


def _fail(exc: UserError) -> None:
    err.print(f"[bold red]error:[/] {escape(redact_text(str(exc)))}", highlight=False)
    raise typer.Exit(code=2)


def _warn(text: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(redact_text(text.removeprefix('warning: ')))}", highlight=False)


@contextmanager
def _one_line_usage_errors():
    try:
        yield
    except NoArgsIsHelpError:
        raise
    except UsageError as exc:  # unknown command or option, bad option value
        where = exc.ctx.command_path if exc.ctx else "harness"
        _fail(UserError(f"{where}: {exc.format_message()} (see `{where} --help`)"))


class _Commands(TyperGroup):
    """Usage errors print one line and exit 2, like every other bad input (not click's usage box)."""

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  help="vlmlab: train and score small vision-language models, reproducibly.")


@app.callback()
def _private_and_redacted(ctx: typer.Context) -> None:
    """For every command: what it prints passes the secret redactor, and what it creates (run directories,
    config.yaml, MLflow's SQLite file, the outbox: data and tracking URIs) is readable by its owner only."""
    streams, umask = (sys.stdout, sys.stderr), os.umask(0o077)
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)

    def restore() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
        os.umask(umask)

    ctx.call_on_close(restore)


def _disk_full(exc: BaseException) -> str | None:
    """The file (or message) of an out-of-space error, also when it happened inside a Ray worker."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return str(exc.filename or exc)
    text = str(exc)
    if "No space left on device" in text:
        line = next(ln for ln in text.splitlines() if "No space left on device" in ln)
        return line.strip()[:300]
    return None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _interruptible() -> None:
    """SIGTERM (a scheduler's stop, `kill`) is handled like Ctrl-C."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _load(config, overrides):
    from harness.config import load_config

    return load_config(config, overrides)


def with_interval(metrics: dict, key: str) -> str:
    """``0.473 ± 0.031`` (half the 95 % interval) where the interval was recorded."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return f"{metrics[key]:.3f}" + (f" ± {(high - low) / 2:.3f}" if low is not None and high is not None else "")


def _key_metrics(stage: dict) -> dict[str, float]:
    """A few numbers per stage for the summary table: the data stage's sizes summed over its tasks, eval's mean
    accuracy (each task's score follows the table), the first three of any other stage."""
    metrics = {k.split("/", 1)[1]: v for k, v in stage["metrics"].items()
               if k.count("/") == 1 and "prior" not in k and not k.endswith(("_ci_low", "_ci_high"))}
    if stage["name"] == "data":
        totals: dict[str, float] = {}
        for key, value in metrics.items():
            task, _, field = key.partition("_")
            if task in TASKS:
                totals[field] = totals.get(field, 0) + value
        return {"tasks": len({k.partition("_")[0] for k in metrics} & set(TASKS))} | totals
    if "mean_accuracy" in metrics:
        return {"mean_accuracy": metrics["mean_accuracy"]}
    return dict(list(metrics.items())[:3])


def _summary(result: dict) -> None:
    table = Table(title=f"{result['pipeline']} · {result['run_id']}")
    for col in ("stage", "wall s", "accel-h", "cost USD", "key metrics"):
        table.add_column(col, justify="right" if col != "key metrics" else "left")
    for s in result["stages"]:
        shown = ", ".join(f"{k}={int(v):,}" if float(v).is_integer() else f"{k}={v:.3g}"
                          for k, v in _key_metrics(s).items())
        name = f"{s['name']} (cached)" if "reused_from" in s else s["name"]
        table.add_row(name, f"{s['wall_seconds']:.1f}", f"{s['accelerator_hours']:.5f}",
                      f"{s['cost_usd']:.5f}", shown)
    table.add_row("total", f"{result['wall_seconds']:.1f}", f"{result['accelerator_hours']:.5f}",
                  f"{result['cost_usd']:.5f}", "", style="bold")
    console.print(table)
    m = result["metrics"]
    for task in TASKS.values():
        if f"eval/{task.metric}" in m:
            others = [f"{label} {m[f'eval/{key}_{task.metric}']:.3f}" for label, key in
                      (("base", "base"), ("question-only prior", "prior")) if f"eval/{key}_{task.metric}" in m]
            console.print(f"{task.metric}: [bold]{with_interval(m, f'eval/{task.metric}')}[/]"
                          + (f" ({', '.join(others)})" if others else ""))
    console.print(f"run directory: [bold]{result['run_dir']}[/]")


@app.command()
def run(
    pipeline: str = typer.Argument("sft", help="Pipeline name from the config's `pipelines` (sft, dpo, grpo...)."),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides, e.g. sft.max_steps=50"),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    output_dir: str | None = typer.Option(None, "--output-dir", "-o", help="Where run directories go."),
    force: bool = typer.Option(False, "--force", help="Recompute every stage (ignore the stage cache)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print Ray's, TRL's, lm-eval's and datasets' "
                                 "own output here (it always goes to <run dir>/logs/ otherwise)."),
):
    """Run a pipeline end to end (default: `sft` on the embedded tiny preset).

    The console shows one live line per stage (step/total, loss or reward, samples/s, ETA, dollars so far), one
    line per finished stage and the summary; Ray's, the libraries' and the workers' output goes to
    <run dir>/logs/ (-v: here as well)."""
    _run_pipeline(lambda: _load(config, overrides or []), pipeline, output_dir, force, verbose)


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="A checkpoint directory or hub id to score."),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides, e.g. eval.batch_size=32"),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated tasks (default: the config's)."),
    protocol: str | None = typer.Option(None, "--protocol", help="short or lmms (default: the config's)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Score at most this many items per task."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP + " Default: the config.yaml of "
                                      "the run MODEL was trained in, else the default preset."),
    output_dir: str | None = typer.Option(None, "--output-dir", "-o", help="Where run directories go."),
    force: bool = typer.Option(False, "--force", help="Recompute every stage (ignore the stage cache)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print Ray's, TRL's, lm-eval's and datasets' "
                                 "own output here (it always goes to <run dir>/logs/ otherwise)."),
):
    """Score a checkpoint you already have (data + model + eval, recorded like any run): how a base model or a
    colleague's checkpoint gets on the leaderboard."""
    from harness.config import eval_overrides

    def load():
        found, extra = eval_overrides(model, config, tasks, protocol, limit)
        if found:
            console.print(f"data and eval settings from {found}", highlight=False)
        return _load(config or found, [*extra, *(overrides or [])])

    _run_pipeline(load, "eval", output_dir, force, verbose)


def _run_pipeline(load, pipeline: str, output_dir: str | None, force: bool, verbose: bool = False) -> None:
    """Load the config (``load()``), run ``pipeline`` and print its summary; errors as one line."""
    from harness.output import VERBOSE_ENV, Display
    from harness.pipeline import run_pipeline

    _interruptible()
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # inherited by Ray's workers: their output is printed here too
    try:
        cfg = load()
        cfg.stages_of(pipeline)
        with Display(console, capture=True) as display:  # library output to the run's logs until it closes
            result = run_pipeline(cfg, pipeline, output_dir, console=console, force=force, display=display)
    except UserError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: MLflow runs marked KILLED; finished stages are cached and training "
                  "resumes from its last checkpoint: rerun the same command to resume.")
        raise typer.Exit(code=130) from None
    except Exception as exc:
        if not _disk_full(exc):
            raise
        err.print(f"[bold red]error:[/] disk full ({_disk_full(exc)}). Earlier results and cached stages are "
                  "intact (every write is atomic); free some space and rerun the same command to resume.",
                  highlight=False)
        raise typer.Exit(code=1) from None
    _summary(result)


def _num(value) -> str:
    return "missing" if value is None else f"{value:.6g}"


@app.command()
def reproduce(
    target: str = typer.Argument(..., help="A run directory or its result.json."),
    tolerance: float = typer.Option(0.01, "--tolerance", min=0, help="Largest allowed |now - recorded| per metric."),
    trust: bool = typer.Option(False, "--trust", help="Allow what the recorded config would run or change: custom "
                               "GRPO rewards (imported), model.trust_remote_code, a stage's runtime_env."),
    output_dir: str | None = typer.Option(None, "--output-dir", "-o", help="Where the rerun goes "
                                             "(default: beside the recorded run)."),
):
    """Rerun a recorded run's config from scratch and compare its metrics; exit 1 if any differs."""
    from harness.pipeline import run_pipeline
    from harness.reproduce import code_differences, compare_metrics, load_result, manifest_differences, recorded_config

    try:
        recorded, path = load_result(target)
        cfg = recorded_config(recorded, path, trust)
        for difference in code_differences(recorded):  # said before the rerun, so a mismatch is read in context
            _warn(difference)
        from harness.output import Display

        with Display(console, capture=True) as display:  # library output to the rerun's logs
            now = run_pipeline(cfg, recorded["pipeline"], output_dir or str(path.parent.parent), console=console,
                               force=True, display=display)
    except UserError as exc:
        _fail(exc)
    for warning in manifest_differences(recorded["manifest"], now["manifest"]):
        err.print(f"[yellow]warning:[/] manifest differs: {warning}", highlight=False)
    rows = compare_metrics(recorded["metrics"], now["metrics"], tolerance)
    table = Table(title=f"reproduce {recorded['run_id']} (tolerance {tolerance})")
    for col in ("metric", "recorded", "now", "delta", ""):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for r in rows:
        table.add_row(r["metric"], _num(r["recorded"]), _num(r["now"]), _num(r["delta"]),
                      "[green]ok[/]" if r["ok"] else "[red]DIFFERS[/]")
    console.print(table)
    bad = [r["metric"] for r in rows if not r["ok"]]
    if bad:
        err.print(f"[bold red]not reproduced[/]: {', '.join(bad)}", highlight=False)
        raise typer.Exit(code=1)
    console.print(f"[green]reproduced[/]: {len(rows)} metrics within {tolerance} (rerun: {now['run_dir']})")


@app.command()
def sweep(
    preset: str | None = typer.Argument(None, help="dpo-beta | grades | grades-dpo (or leave out and give "
                                        "--space)."),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides for every trial"),
    space: list[str] | None = typer.Option(None, "--space", "-s", help="key=sampler(args): loguniform, "
                                              "uniform, randint, choice, grid. Repeatable."),
    pipeline: str = typer.Option(None, "--pipeline", "-p", help="Pipeline each trial runs (presets set it)."),
    trials: int = typer.Option(4, "--trials", "-n", min=1, help="Trials (grid: the number of grid points)."),
    objective: str | None = typer.Option(None, "--objective", help="An eval metric, or gain_per_usd:<metric> "
                                         "(accuracy gained over the base model per dollar). Default: the preset's "
                                         "(GradES presets: gain_per_usd:eval/mean_accuracy), else eval/mean_accuracy."),
    mode: str = typer.Option("max", "--mode", help="max | min"),
    scheduler: str | None = typer.Option(None, "--scheduler", help="asha: stop trials whose training loss "
                                         "lags (reported at each checkpoint)."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    output_dir: str | None = typer.Option(None, "--output-dir", "-o", help="Where the sweep directory goes."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print the trials' Ray workers' output here "
                                 "(it goes to each trial run's logs/ otherwise)."),
):
    """Sweep hyperparameters with Ray Tune; every trial is scored by the eval stage."""
    from harness.output import VERBOSE_ENV
    from harness.sweep import DEFAULT_OBJECTIVE, PRESETS, parse_space, run_sweep

    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # inherited by the trials (Ray workers of a Ray this process starts)
    try:
        fixed = list(overrides or [])
        if preset is not None and "=" in preset:  # no preset: the first word is already an override
            fixed, preset = [preset, *fixed], None
        if preset is not None:
            if preset not in PRESETS:
                raise UserError(f"unknown sweep preset '{preset}' (known: {', '.join(PRESETS)})")
            chosen = PRESETS[preset]
            fixed = chosen.fixed + fixed
            pipeline = pipeline or chosen.pipeline
            swept = chosen.space(trials) | parse_space(space or [])
        else:
            if not space:
                raise UserError("give a preset (dpo-beta, grades) or at least one --space")
            swept = parse_space(space)
        objective = objective or (PRESETS[preset].objective if preset else DEFAULT_OBJECTIVE)
        if scheduler not in (None, "asha"):
            raise UserError(f"--scheduler must be asha (got {scheduler!r})")
        if mode not in ("max", "min"):
            raise UserError(f"--mode must be max or min (got {mode!r})")
        cfg = _load(config, fixed)
        result = run_sweep(cfg, pipeline or "sft", [], swept, trials, objective, mode, output_dir, console, scheduler)
    except UserError as exc:
        _fail(exc)
    table = Table(title=f"sweep {result['sweep_id']} · {objective}")
    for col in ("#", *swept, objective, "cost USD", "status"):
        table.add_column(col, justify="right")
    for i, t in enumerate(result["trials"], 1):
        obj = "" if t["objective"] is None else f"{t['objective']:.4g}"
        table.add_row(str(i), *[f"{t['params'][k]:.4g}" if isinstance(t["params"][k], float) else str(t["params"][k])
                                for k in swept], obj, f"{t['cost_usd']:.5f}",
                      t["status"] if not t["error"] else f"ERROR: {t['error'][:60]}")
    console.print(table)
    if result["best"]:
        console.print(f"best: {result['best']['params']} -> {objective} = {result['best']['objective']:.4g}")
    grades = result.get("grades")
    if grades:
        pick = grades["pick"]
        console.print(f"GradES vs the reference (observing, {grades['reference']['stage_wall_seconds']:.0f} s): "
                      + (f"pick {' '.join(grades['pick_overrides'])} -> {pick['speedup']:.2f}x, "
                         f"{grades['metric']} {pick['accuracy_delta']:+.4f}" if pick else
                         f"no trial within {grades['accuracy_tolerance']} of the reference's accuracy")
                      + " (pareto.png)")
    console.print(f"sweep directory: [bold]{result['sweep_dir']}[/] (total cost {result['cost_usd']:.5f} USD)")


def _ui_hint(uri: str, experiment_id: str) -> str:
    """Where to see these runs with their cost columns in MLflow's own UI."""
    from harness.secrets import redact_text
    from harness.tracking import cost_view_url

    view = cost_view_url(experiment_id)
    if uri.startswith(("http://", "https://")):
        return f"MLflow UI with these columns: {redact_text(uri.rstrip('/'))}/{view}"
    return f"MLflow UI with these columns: run `harness ui`, then open http://127.0.0.1:5000/{view}"


@app.command()
def leaderboard(
    experiment: str = typer.Option("vlmlab", "--experiment", "-e", help="MLflow experiment to read."),
    pipeline: str | None = typer.Option(None, "--pipeline", "-p", help="Only runs of this pipeline."),
    metric: str = typer.Option("eval/mean_accuracy", "--metric", "-m", help="Accuracy metric to rank by."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | markdown | csv | json"),
    plot_path: str | None = typer.Option(None, "--plot", help="Write a cost-vs-accuracy PNG here."),
    sort: str = typer.Option("acc", "--sort", "-s", help="Column to order by: acc, vqa, chart, usd, $/pt, acc-h, "
                             "util, run, pipe, model (accuracies and util best first, costs cheapest first)."),
    filters: list[str] | None = typer.Option(None, "--filter", help="KEY=VALUE with KEY pipeline, model or run; "
                                             "VALUE may use * and ? (e.g. model='*SmolVLM*'). Repeatable."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="Default: $MLFLOW_TRACKING_URI "
                                               "or sqlite:///mlflow.db"),
):
    """Runs ranked by accuracy with their cost; marks the Pareto front (no run both cheaper and better)."""
    from harness import leaderboard as lb
    from harness.config import TrackingConfig

    if fmt not in ("table", "markdown", "csv", "json"):
        _fail(UserError(f"--format must be table, markdown, csv or json (got {fmt!r})"))
    uri = TrackingConfig(uri=tracking_uri).resolved_uri()
    try:
        rows = lb.collect(uri, experiment, pipeline, metric, filters, sort)
    except UserError as exc:
        _fail(exc)
    except Exception as exc:  # an unreachable or foreign store
        _fail(UserError(f"cannot read MLflow at {uri}: {exc}"))
    if not rows:
        console.print(f"No finished vlmlab runs with '{metric}' in experiment '{experiment}' at {uri}. "
                      "Run `harness run sft` first.")
        return
    if fmt != "table":
        print(lb.render(rows, fmt))
    else:
        console.print(lb.table(rows, f"leaderboard · {experiment} · {metric}"))
        console.print("★ Pareto front: no other run shown is both cheaper and more accurate.\n"
                      "acc-h: accelerator-hours · $/pt: USD per accuracy point · util: busy/held time")
        console.print(_ui_hint(uri, rows[0]["experiment_id"]), soft_wrap=True)
    if plot_path:
        fig = lb.plot(rows, plot_path, metric)
        from harness.tracking import Tracker
        tracker = Tracker(uri, experiment)
        run_id = tracker.start("leaderboard", tags={"vlmlab.kind": "leaderboard"})
        tracker.log_figure(run_id, fig, "leaderboard.png")
        tracker.end(run_id)
        err.print(f"plot written to {plot_path} (and logged to MLflow run 'leaderboard')")


TRACKING_HELP = "Default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db"


@app.command()
def runs(
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="How many runs, newest first."),
    experiment: str = typer.Option("vlmlab", "--experiment", "-e", help="MLflow experiment to read."),
    output_dir: str = typer.Option("runs", "--output-dir", "-o", help="Run directories to list too (those MLflow "
                                   "does not know)."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
):
    """Recent runs, newest first: id, pipeline, status, accuracies and cost."""
    from harness import report
    from harness.config import TrackingConfig

    uri = TrackingConfig(uri=tracking_uri).resolved_uri()
    try:
        rows = report.recent_runs(uri if report.store_exists(uri) else None, experiment, output_dir, limit)
    except Exception as exc:  # an unreachable or foreign store
        _fail(UserError(f"cannot read MLflow at {uri}: {exc}"))
    if not rows:
        console.print(f"No runs in MLflow experiment '{experiment}' at {uri} nor under {output_dir}/. "
                      "Run `harness run sft` first.")
        return
    console.print(report.runs_table(rows))
    console.print("acc: eval/mean_accuracy; vqa, chart: the final model's VQAv2 and ChartQA accuracy. "
                  "`harness report RUN` draws a run's figures.")


@app.command()
def report(
    target: str = typer.Argument(..., help="A run directory, or a run id (under --output-dir or in MLflow)."),
    experiment: str | None = typer.Option(None, "--experiment", "-e", help="Default: the run's tracking.experiment."),
    output_dir: str = typer.Option("runs", "--output-dir", "-o", help="Where run directories are."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="Default: the run's tracking.uri, "
                                            "$MLFLOW_TRACKING_URI or sqlite:///mlflow.db"),
):
    """One run's figures in a self-contained HTML file, also logged to its MLflow run.

    Writes <run dir>/report/report.html (figures embedded) and the same figures as PNG files beside it: loss per
    training stage, DPO reward margin and accuracy, GRPO rewards, accuracy per question type (base, question-only
    prior, each checkpoint), cost per stage, GradES frozen fraction."""
    from harness import report as rep

    try:
        run = rep.resolve(target, tracking_uri, experiment, output_dir)
        path = rep.write_report(run)
    except UserError as exc:
        _fail(exc)
    for note in run.notes:
        _warn(note)
    logged = " and logged to its MLflow run (artifacts: report/)" if run.mlflow_run_id else ""
    console.print(f"report written to [bold]{path}[/]{logged}", soft_wrap=True)


@app.command()
def ui(
    port: int = typer.Option(5000, "--port", "-p", help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    experiment: str = typer.Option("vlmlab", "--experiment", "-e", help="Experiment whose cost view to print."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help=TRACKING_HELP),
):
    """Start `mlflow ui` on the run store and print the cost view's address; Ctrl-C stops it.

    The cost view is the runs table with the accuracy and cost columns shown."""
    from harness import report
    from harness.config import TrackingConfig

    _interruptible()
    uri = TrackingConfig(uri=tracking_uri).resolved_uri()
    try:
        report.serve_ui(uri, host, port, experiment, say=lambda text: console.print(text, soft_wrap=True))
    except UserError as exc:
        _fail(exc)


@app.command()
def sync(
    run_dir: str = typer.Argument(..., help="A run directory whose MLflow writes were kept locally."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="Default: the run's tracking.uri, "
                                            "$MLFLOW_TRACKING_URI or sqlite:///mlflow.db"),
):
    """Replay the MLflow writes a run kept locally while the tracking store was unreachable (safe to rerun: a
    sync stopped part-way resumes, and nothing is written twice)."""
    from pathlib import Path

    import yaml

    from harness.config import TrackingConfig
    from harness.tracking import outbox_files, sync_outbox

    root = Path(run_dir)
    if not root.is_dir():
        _fail(UserError(f"{root} is not a directory: give a run directory (runs/<run id>)"))
    if not outbox_files(root):
        console.print(f"nothing to sync in {root}")
        return
    recorded = (yaml.safe_load((root / "config.yaml").read_text()) or {}).get("tracking", {}) \
        if (root / "config.yaml").exists() else {}
    uri = TrackingConfig(uri=tracking_uri or recorded.get("uri")).resolved_uri()
    notes: list[str] = []
    try:
        done = sync_outbox(uri, root, warn=lambda text: (notes.append(text), _warn(text)))
    except Exception as exc:  # unreachable, refused part-way (progress kept), unreadable files
        _fail(UserError(f"sync to {uri} failed: {exc}"))
    set_aside = f"; {len(notes)} warning(s) above" if notes else ""
    console.print(f"[green]synced[/] {done} MLflow writes from {root} to {uri}{set_aside}")


@app.command()
def validate(
    config: str = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides"),
):
    """Check a config (and overrides) without running anything: keys, values, pipelines, GRPO rewards (read, not
    imported), the device's price, local data sources."""
    from harness.inputs import check_inputs
    from stages import STAGES

    try:
        cfg = _load(config, overrides or [])
        stages = list(dict.fromkeys(name for chain in cfg.pipelines.values() for name in chain))
        for name in stages:
            STAGES[name].check(cfg)
        check_inputs(cfg, stages, say=_warn)
    except UserError as exc:
        _fail(exc)
    console.print(f"[green]ok[/]: {config} (pipelines: {', '.join(cfg.pipelines)}; "
                  f"config sha256 {cfg.config_hash()[:12]})")


@app.command()
def gc(
    output_dir: str = typer.Option("runs", "--output-dir", "-o", help="The output dir to clean."),
    keep: int = typer.Option(5, "--keep", min=1, help="Runs to keep per pipeline (the newest)."),
    apply: bool = typer.Option(False, "--apply", help="Delete; without it, only say what would go."),
):
    """Free an output dir: keep the last N runs per pipeline and the cache entries and runs they use."""
    from pathlib import Path

    from harness import gc as collector

    root = Path(output_dir).expanduser()
    if "://" in output_dir or not root.is_dir():
        _fail(UserError(f"--output-dir: {output_dir} is not a local directory; give the directory `harness run` "
                        "wrote to (a bucket's checkpoints are deleted in the bucket)"))
    plan = collector.plan(root, keep)
    mb = plan.size() / 1e6
    console.print(f"{'freeing' if apply else 'would free'} {mb:.1f} MB: {len(plan.runs)} run dir(s), "
                  f"{len(plan.entries)} cache entr(y/ies), {len(plan.storage)} Ray storage dir(s); "
                  f"keeping {plan.kept_runs} run(s)", highlight=False)
    for path in plan.paths:
        console.print(f"  {path}", highlight=False)
    if apply:
        collector.apply(plan)
    elif plan.paths:
        console.print("dry run: rerun with --apply to delete")


@app.command()
def env(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Print package versions and hardware."""
    from harness.manifest import hardware, package_versions

    info = {"packages": package_versions(), "hardware": hardware()}
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(show_header=False)
    for section, values in info.items():
        for key, value in values.items():
            table.add_row(section, key, str(value))
    console.print(table)


@app.command()
def estimate(
    pipeline: str = typer.Argument("sft", help="Pipeline name from the config's `pipelines`."),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides, e.g. sft.max_steps=3000"),
    device: list[str] | None = typer.Option(None, "--device", "-d", help="T4, L4, A10G, A100, H100, H200 or cpu "
                                            "(this machine); repeatable or comma-separated. Default: all."),
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", min=2, help="Calibration steps per training stage."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Predict a pipeline's wall time and cost per device from a short calibration run on this machine.

    The calibration runs the pipeline shortened (a few steps of each training stage, a slice of eval) in a
    temporary directory with its own MLflow store; other devices are scaled by FLOPs, peak and an assumed MFU
    (harness/estimate.py). The assumptions are printed under the tables."""
    from harness.estimate import estimate as predict
    from harness.estimate import parse_devices, render

    _interruptible()
    try:
        devices = parse_devices(device)
        cfg = _load(config, overrides or [])
        result = predict(cfg, pipeline, devices, steps, console=None if as_json else console)
    except UserError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: nothing was kept (the calibration ran in a temporary directory)")
        raise typer.Exit(code=130) from None
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        render(result, console)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
