"""What `harness run` prints, and where everything else goes.

The console gets one live line (or bar) per stage: step/total, loss or reward, samples/s, ETA and the dollars the
stage has held so far; one line per finished stage; the final table; and warnings and errors, once each, as one
vlmlab line. Everything else (Ray, TRL, lm-eval, datasets, MLflow) goes to ``<run dir>/logs/``:

* ``run.log`` — the driver's output outside any stage, ``<stage>.log`` — the driver's output during that stage;
* ``ray/<stage>.rank<k>.log`` (training ranks), ``ray/<stage>.shard<i>.log`` (eval and generation shards) — what
  the stage's Ray workers printed, written by the workers themselves, so it also lands there on a cluster.

How the workers' numbers reach the driver: a training stage's rank 0 rewrites ``logs/.live/<stage>.json`` (at most
once a second: step, total, the last loss/reward, the global batch); each worker appends the warnings it logs to
``logs/.live/<stage>.<worker>.warnings``; the driver reads both twice a second. The run directory is on storage
every node sees, so this needs no extra Ray actor. Shard stages count finished Ray tasks in the driver.

``-v`` (``VLMLAB_VERBOSE=1``) keeps today's behaviour: every library's and worker's output on the console.
Without a TTY (CI, ``ray job submit`` logs) progress is plain lines, per stage at most one per 10 % of its steps
and at most one per 30 s.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
from rich.text import Text

from runtime.errors import UserError
from runtime.output import (
    Watcher,
    WorkerLog,
    active_stage,
    collecting,
    first_line,
    redact_file,
    set_active_stage,
    set_capturing,
    verbose,
)
from runtime.secrets import RedactingStream

PLAIN_EVERY_S = 30.0  # without a TTY: at most one progress line per stage every 30 s ...
PLAIN_EVERY_FRACTION = 0.1  # ... and one per 10 % of its steps
POLL_S = 0.5
STREAM_POLL_S = 5.0  # where rank 0's progress file is out of sight: ask the MLflow store at most this often
# Warnings that say nothing a vlmlab user can act on: kept in the logs, not shown. (pattern, reason)
QUIET = [re.compile(p) for p in (
    r"Token authentication is enabled",  # the local Ray vlmlab starts, or the cluster's own setting
    r"mtime may not be reliable",  # transformers sorting checkpoints on a network/overlay filesystem
    r"HF model type is neither marked as CausalLM",  # lm-eval on every VLM (vlmlab sets the backend)
    r"Failed to determine local IP",  # Ray on a machine without a route to the internet
    r"hostname of the client socket cannot be retrieved",  # torch c10d in a loopback-only network
    r"`is_gradient_checkpointing` is deprecated",  # TRL's DPO trainer calling transformers' old name
)]


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def usd(value: float) -> str:
    return f"${value:.4f}" if value < 1 else f"${value:.2f}"


def _quiet(message: str) -> bool:
    return any(p.search(message) for p in QUIET)



class _Stage:
    """A stage the driver is running: its log files and its progress as last seen."""
    def __init__(self, display: Display, name: str, logs: Path | None, cost=None, progress_from=None):
        self.display, self.name, self.logs, self.cost = display, name, logs, cost
        self.progress_from, self._asked = progress_from, 0.0
        self.started = time.monotonic()
        self.label, self.step, self.total = name, 0, None
        self.metric: tuple[str, float] | None = None
        self.rate_from: tuple[float, int] | None = None  # (time, step) of the first progress seen in this phase
        self.samples_per_s: float | None = None
        self.eta: float | None = None
        self.printed_at, self.printed_bucket = self.started, 0
        self.changed = False
        self._offsets: dict[Path, int] = {}
        self.lock = threading.Lock()

    @property
    def live(self) -> Path | None:
        return self.logs / ".live" if self.logs else None

    def worker_log(self, worker: str, progress: bool = False, label: str | None = None) -> WorkerLog | None:
        """The log of one of this stage's workers (``worker``: rank0, shard3...); None when output is verbose."""
        if self.logs is None or verbose():
            return None
        self.live.mkdir(parents=True, exist_ok=True)
        label = label or self.name
        return WorkerLog(path=str((self.logs / "ray" / f"{label}.{worker}.log").resolve()),
                         warnings=str((self.live / f"{label}.{worker}.warnings").resolve()),
                         progress=str((self.live / f"{self.name}.json").resolve()) if progress else None)

    def update(self, step: int, total: int | None = None, label: str | None = None, metric=None,
               global_batch: int | None = None) -> None:
        """New progress (from the driver's own shard count, or read from rank 0's progress file)."""
        with self.lock:
            now = time.monotonic()
            if label is not None and label != self.label:  # a new phase (e.g. DPO's generation, then training)
                self.label, self.rate_from, self.samples_per_s, self.eta = label, None, None, None
                self.printed_bucket = 0
            if total is not None:
                self.total = total
            if self.rate_from is None or step < self.rate_from[1]:
                self.rate_from = (now, step)
            self.step, self.metric = step, metric if metric is not None else self.metric
            since, first = self.rate_from
            if step > first and now > since:
                per_step = (now - since) / (step - first)
                self.eta = per_step * max(0, (self.total or step) - step)
                if global_batch:
                    self.samples_per_s = global_batch / per_step
            self.changed = True

    def usd(self) -> float | None:
        if self.cost is None:
            return None
        with contextlib.suppress(Exception):
            return self.cost()
        return None

    def line(self, head: bool = True) -> str:
        """``sft  250/1000 25%  loss 1.234  41.2 samples/s  ETA 3m10s  $0.0012`` (``head=False``: from the loss on,
        for the live bar, which shows the name and count itself)."""
        parts = []
        if head:
            parts.append(f"{self.label:<5}")
            if self.total:
                parts.append(f"{self.step}/{self.total} {100 * self.step / self.total:3.0f}%")
        if self.metric is not None and math.isfinite(self.metric[1]):
            value = self.metric[1]
            parts.append(f"{self.metric[0]} {value:.3f}" if abs(value) < 1000 else f"{self.metric[0]} {value:.4g}")
        if self.samples_per_s:
            parts.append(f"{self.samples_per_s:.1f} samples/s")
        if self.eta is not None and self.total and self.step < self.total:
            parts.append(f"ETA {duration(self.eta)}")
        cost = self.usd()
        if cost is not None:
            parts.append(usd(cost))
        return "  ".join(parts)

    def _progress_state(self, path: Path) -> dict | None:
        """Rank 0's progress file; where the driver does not see it (rank 0 on a node without storage shared under
        the run directory), the step metrics the workers stream to the stage's MLflow run (``progress_from``)."""
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())
        if self.progress_from is None or time.monotonic() - self._asked < STREAM_POLL_S:
            return None
        self._asked = time.monotonic()
        with contextlib.suppress(Exception):  # a store that is down or slow costs the console a line, no more
            return self.progress_from()
        return None

    def poll(self) -> None:
        """Read rank 0's progress (file, or the MLflow stream) and the workers' warnings."""
        live = self.live
        if live is None or not live.is_dir():
            return
        state = self._progress_state(live / f"{self.name}.json")
        if state and (state.get("step", 0) != self.step or state.get("label", self.name) != self.label):
            metric = state.get("metric")
            self.update(int(state["step"]), state.get("total"), state.get("label", self.name),
                        tuple(metric) if metric else None, state.get("global_batch"))
        for path in sorted(live.glob("*.warnings")):
            with contextlib.suppress(OSError):
                with open(path, encoding="utf-8") as f:
                    f.seek(self._offsets.get(path, 0))
                    lines = f.readlines()
                    if lines and not lines[-1].endswith("\n"):  # a line being written: read it next time
                        lines.pop()
                    self._offsets[path] = self._offsets.get(path, 0) + sum(len(ln.encode()) for ln in lines)
                for ln in lines:
                    with contextlib.suppress(ValueError):
                        w = json.loads(ln)
                        self.display.warn(w.get("message", ""), w.get("source"), w.get("level", "WARNING"))


class _Surface(Watcher):
    """In the driver: the libraries' warnings, shown once each."""
    def __init__(self, display: Display):
        super().__init__()
        self.display = display

    def seen_record(self, source: str, level: str, message: str) -> None:
        self.display.warn(message, source, level)


class Display:
    """The console of one `harness run` (see the module doc).

    ``capture=True`` (the CLI) sends this process's own stdout/stderr (file descriptors) to the run's logs while it
    is open, and prints through a duplicate of the original stdout; use it as a context manager. ``console`` may be
    None (nothing printed; workers still log to the run's logs).
    """

    def __init__(self, console=None, capture: bool = False, live: bool | None = None):
        self.verbose = verbose()
        self.capture = capture and not self.verbose
        self.console = self._given_console = console
        self.live = (console is not None and console.is_terminal and not self.verbose) if live is None else live
        self.shown: set[str] = set()
        self._saved: list[int] = []
        self._file = None
        self._out = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress = None
        self._task = None
        self._surface: _Surface | None = None
        self._collect = None
        self.logs: Path | None = None
        self.failed_stage: str | None = None

    # -- lifecycle
    def __enter__(self) -> Display:
        if self.capture:
            self._start_capture()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.failed_stage and self.logs is not None:
            if not issubclass(exc_type, (UserError, KeyboardInterrupt)):  # a crash: where its full story is
                self.say(f"stage {self.failed_stage} failed: its output is in {self.logs / self.failed_stage}.log, "
                         f"its Ray workers' in {self.logs / 'ray'}/")
        self.close()

    def _start_capture(self) -> None:
        set_capturing(True)
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # the logs need no progress bars either
        sys.stdout.flush()
        sys.stderr.flush()
        if self.console is not None and self._fd_backed(sys.stdout):
            # the console keeps the real stdout; the process's fds 1 and 2 go to the logs
            self._out = os.fdopen(os.dup(1), "w", encoding=getattr(sys.stdout, "encoding", None) or "utf-8",
                                  errors="replace", buffering=1)
            self.console = Console(file=RedactingStream(self._out), soft_wrap=True, markup=False, emoji=False)
            self.live = self.console.is_terminal
        self._saved = [os.dup(1), os.dup(2)]
        self._file = tempfile.TemporaryFile()  # until the run directory is known
        self._point(self._file.fileno())
        self._surface = _Surface(self)
        self._collect = collecting(self._surface, lambda kind, text: self.warn(text, kind))
        self._collect.__enter__()

    @staticmethod
    def _fd_backed(stream) -> bool:
        try:
            return stream.fileno() == 1
        except Exception:
            return False

    def _point(self, fd: int) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)

    def _log_to(self, path: Path) -> None:
        """Send the captured output to ``path`` from now on."""
        if not self.capture:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if self._file is not None:  # what came before the run directory existed
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            self._file.seek(0)
            os.write(fd, self._file.read())
            self._file.close()
            self._file = None
        self._point(fd)
        os.close(fd)

    def open_run(self, run_dir: Path) -> None:
        """The run directory is known: its logs/ take the output from now on."""
        self.logs = run_dir / "logs"
        self._log_to(self.logs / "run.log")
        if self.live and self.console is not None and self._progress is None:
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                                      TextColumn("{task.fields[info]}", markup=False), console=self.console,
                                      transient=True, redirect_stdout=False, redirect_stderr=False,
                                      refresh_per_second=4)
            self._progress.start()
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="vlmlab-progress", daemon=True)
            self._thread.start()

    def close(self) -> None:
        set_active_stage(None)
        set_capturing(False)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._collect is not None:
            self._collect.__exit__(None, None, None)
            self._collect = None
        if self._saved:
            self._point(self._saved[0])
            os.dup2(self._saved[1], 2)
            for fd in self._saved:
                os.close(fd)
            self._saved = []
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.logs is not None and self.logs.is_dir():
            for path in self.logs.rglob("*.log"):
                redact_file(path)
        if self._out is not None:
            with contextlib.suppress(Exception):
                self._out.flush()
            self._out.close()  # a duplicate of fd 1: the real stdout stays open
            self._out = None
            self.console = self._given_console

    def log_files(self) -> list[Path]:
        """The run's log files as they are now, redacted (to upload with the run)."""
        if self.logs is None or not self.logs.is_dir():
            return []
        files = sorted(p for p in self.logs.rglob("*.log") if p.is_file())
        for path in files:
            redact_file(path)
        return files

    # -- printing
    def say(self, text: str, label: str | None = None) -> None:
        """One line of plain text (paths, names and messages are shown as they are: no markup, no emoji), after a
        yellow ``label`` when given."""
        if self.console is not None:
            self.console.print(Text.assemble((f"{label}: ", "yellow") if label else "", text), highlight=False)

    def warn(self, message: str, source: str | None = None, level: str = "WARNING") -> None:
        """A library's warning or error, shown once, as one vlmlab line (the full text is in the logs)."""
        line = first_line(message)
        if not line or _quiet(line) or line in self.shown:
            return
        self.shown.add(line)
        kind = "error" if level in ("ERROR", "CRITICAL") else "warning"
        where = f" (see {self.logs})" if self.logs is not None and kind == "error" else ""
        self.say(f"{source + ': ' if source else ''}{line}{where}", label=kind)

    def begin_stage(self, name: str, progress_from=None) -> _Stage:
        """Stage ``name`` starts: its driver output goes to logs/<stage>.log, its progress to the console.
        ``progress_from()``, where given, returns the stage's progress from elsewhere than rank 0's file (see
        ``_Stage._progress_state``)."""
        if self.logs is not None:
            self._log_to(self.logs / f"{name}.log")
        stage = _Stage(self, name, self.logs, progress_from=progress_from)
        if self._progress is not None:
            self._task = self._progress.add_task(name, total=None, info="")
        set_active_stage(stage)
        return stage

    def end_stage(self, name: str) -> None:
        """Stage ``name`` ended (done, reused or failed): its last warnings, its logs redacted, back to run.log."""
        stage = active_stage()
        set_active_stage(None)
        if sys.exc_info()[1] is not None:  # called from a `finally` while the stage's exception propagates
            self.failed_stage = name
        if stage is not None:
            with contextlib.suppress(Exception):
                stage.poll()
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        if self.logs is None:
            return
        live = self.logs / ".live"
        if live.is_dir():
            for path in live.glob(f"{name}*"):
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                live.rmdir()
        for path in [self.logs / f"{name}.log", *(self.logs / "ray").glob(f"{name}*.log")]:
            if path.exists():
                redact_file(path)
        self._log_to(self.logs / "run.log")

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            stage = active_stage()
            if stage is None:
                continue
            try:
                stage.poll()
                self.render(stage)
            except Exception:  # a display problem never stops a run
                pass

    def render(self, stage: _Stage) -> None:
        """Show ``stage``'s progress: the live bar, or (no TTY) a plain line when the throttle allows one."""
        if self._progress is not None and self._task is not None:
            count = f"{stage.step}/{stage.total}" if stage.total else ""
            self._progress.update(self._task, description=f"{stage.label} {count}", total=stage.total,
                                  completed=stage.step, info=stage.line(head=False))
            return
        with stage.lock:
            if not stage.changed or not stage.total:
                return
            stage.changed = False
            now = time.monotonic()
            bucket = int(stage.step / stage.total / PLAIN_EVERY_FRACTION + 1e-9)
            if bucket <= stage.printed_bucket or stage.step >= stage.total or now - stage.printed_at < PLAIN_EVERY_S:
                return
            stage.printed_bucket, stage.printed_at = bucket, now
        self.say(stage.line())



def finished_note(metrics: dict, name: str, cost: float) -> str:
    """What the line of a finished stage adds to its wall time: steps, final loss, accuracy, dollars."""
    parts = []
    if isinstance(metrics.get(f"{name}/steps"), (int, float)):
        parts.append(f"{int(metrics[f'{name}/steps'])} steps")
    for key, label in ((f"{name}/loss_end", "loss"), (f"{name}/reward_end", "reward"),
                       (f"{name}/mean_accuracy", "mean accuracy")):
        if isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key]):
            parts.append(f"{label} {metrics[key]:.3g}")
    if cost:
        parts.append(usd(cost))
    return f" ({', '.join(parts)})" if parts else ""

