"""The worker side of the run's console: where a Ray worker's output goes, and how its numbers reach the driver.

A stage's Ray workers (training ranks, eval and generation shards) write their stdout/stderr to the run's logs
(``worker_output``), append the warnings they log to a file the driver reads, and rank 0 of a training stage rewrites
a progress file (``write_progress``). The driver's half (the live line, the logs of the driver itself) is
``harness/console.py``; it registers the stage it is running here (``set_active_stage``), so that `runtime.raytrain`
can ask where the workers of that stage log without importing the console.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from runtime.secrets import redact_text

VERBOSE_ENV = "VLMLAB_VERBOSE"
PROGRESS_ENV = "VLMLAB_PROGRESS_FILE"  # set inside a training stage's rank 0 only
# library loggers that keep their records to themselves (propagate=False): warnings are collected from each
LIBRARY_LOGGERS = ("ray", "mlflow", "transformers", "datasets", "trl", "lm-eval", "lm_eval", "accelerate", "peft",
                   "torch", "py.warnings")


class ActiveStage(Protocol):
    """What the driver's console offers about the stage it is running (harness/console.py's _Stage)."""
    cost: object

    def worker_log(self, worker: str, progress: bool = False, label: str | None = None) -> WorkerLog | None: ...

    def update(self, step: int, total: int | None = None, label: str | None = None, metric=None,
               global_batch: int | None = None) -> None: ...


_ACTIVE: ActiveStage | None = None  # the stage the driver is running now (raytrain asks it where workers log)
_CAPTURING = False  # a console sends this process's output to the logs: Ray must not forward its workers' output


def active_stage() -> ActiveStage | None:
    return _ACTIVE


def set_active_stage(stage: ActiveStage | None) -> None:
    global _ACTIVE
    _ACTIVE = stage


def set_capturing(on: bool) -> None:
    global _CAPTURING
    _CAPTURING = on


def forward_worker_output() -> bool:
    """Whether a Ray this process starts or attaches to should print its workers' output here (``log_to_driver``):
    not under `harness run` without -v, whose workers write to the run's logs."""
    return not _CAPTURING


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def redact_file(path: Path) -> None:
    """Redact a log file in place (same inode: processes may still hold it open)."""
    try:
        with open(path, "r+", encoding="utf-8", errors="replace", newline="") as f:
            text = f.read()
            clean = redact_text(text)
            if clean != text:
                f.seek(0)
                f.write(clean)
                f.truncate()
    except OSError:
        pass


def first_line(text: str, limit: int = 200) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return " ".join(line.split())[:limit]



@dataclass(frozen=True)
class WorkerLog:
    """Where one Ray worker's output goes (picklable: it travels with the task)."""
    path: str  # the worker's log file
    warnings: str  # where it appends the warnings it logs (one JSON line each)
    progress: str | None = None  # a training stage's rank 0: the progress file it rewrites


class Watcher(logging.Handler):
    """Sees every WARNING+ record of the process (on the root and the library loggers); a record no other handler
    takes is written to stderr (the log) as Python's last-resort handler would have."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "_vlmlab_seen", False):  # attached to a logger and to its parent: one record, once
            return
        record._vlmlab_seen = True
        with contextlib.suppress(Exception):
            message = record.getMessage()
            if not self._handled_elsewhere(record.name):
                sys.stderr.write(f"{record.levelname} {record.name}: {message}\n")
            self.seen_record(record.name.split(".")[0], record.levelname, message)

    def seen_record(self, source: str, level: str, message: str) -> None:
        raise NotImplementedError

    def _handled_elsewhere(self, name: str) -> bool:
        lg = logging.getLogger(name)
        while lg is not None:
            if any(h is not self for h in lg.handlers):
                return True
            if not lg.propagate:
                return False
            lg = lg.parent
        return False


class _Collector(Watcher):
    """In a worker: appends each distinct warning of this process to a JSON-lines file, for the driver to show."""

    def __init__(self, path: str):
        super().__init__()
        self.path, self.seen = path, set()

    def seen_record(self, source: str, level: str, message: str) -> None:
        self.note(source, level, message)

    def note(self, source: str, level: str, message: str) -> None:
        line = first_line(message)
        if not line or line in self.seen:
            return
        self.seen.add(line)
        with contextlib.suppress(OSError), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"source": source, "level": level, "message": line}) + "\n")


@contextlib.contextmanager
def collecting(collector: logging.Handler, surface_warning):
    """Attach ``collector`` to the root and library loggers, and see Python warnings; undone on exit."""
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in LIBRARY_LOGGERS]
    for lg in loggers:
        lg.addHandler(collector)
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        shown(message, category, filename, lineno, file, line)  # into the log, as before
        with contextlib.suppress(Exception):
            surface_warning(category.__name__, str(message))

    warnings.showwarning = showwarning
    try:
        yield
    finally:
        warnings.showwarning = shown
        for lg in loggers:
            lg.removeHandler(collector)


@contextlib.contextmanager
def worker_output(log: WorkerLog | None):
    """Inside a Ray worker: this process's stdout and stderr (file descriptors: C++ and tqdm too) go to the
    worker's log file, its warnings to the driver; everything is restored (and the file redacted) on exit."""
    if log is None:
        yield
        return
    Path(log.path).parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(log.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    collector = _Collector(log.warnings)
    if log.progress:
        os.environ[PROGRESS_ENV] = log.progress
    try:
        with collecting(collector, lambda kind, text: collector.note(kind, "WARNING", text)):
            yield
    finally:
        os.environ.pop(PROGRESS_ENV, None)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        redact_file(Path(log.path))


def write_progress(path: str, state: dict) -> None:
    """Rank 0 of a training stage: the stage's progress, replaced atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(OSError):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(tmp, path)
