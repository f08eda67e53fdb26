"""What every command shares: the two consoles, one-line warnings, the config loader, SIGTERM as Ctrl-C."""
from __future__ import annotations

import errno
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from rich.console import Console
from rich.text import Text

from runtime.errors import UserError
from runtime.secrets import redact_text

if TYPE_CHECKING:
    from runtime.config import PipelineConfig

# Text is text: markup and emoji off, so a path, name or message prints as written (rich would draw `vqav2:train:`'s
# ':train:' as an emoji and drop a `[...]`); vlmlab's own colours go through styled()
console = Console(markup=False, emoji=False)
err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)  # messages stay on one line: greppable in logs


def styled(*parts: str | tuple[str, str]) -> Text:
    """One line from plain strings and ``(text, style)`` pairs, e.g. ``styled(("ok", "green"), ": ", path)``."""
    return Text.assemble(*parts)

CONFIG_HELP = "Preset name in configs/ (default: tiny) or a YAML file."
TRACKING_HELP = "Default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db"
VERBOSE_HELP = ("Also print Ray's, TRL's, lm-eval's and datasets' own output here (it always goes to <run dir>/logs/ "
                "otherwise).")


def one_line(text: str) -> str:
    """Text as one printable line: line breaks and other control characters a file or value carried are shown as
    escapes (``\\n``, ``\\x1e``), so a message is always the one line it claims to be."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def error_line(text: str) -> None:
    """``error: <text>`` on stderr, redacted, markup-free, one line: what a user gets for bad input."""
    err.print(styled(("error:", "bold red"), " ", one_line(redact_text(text))), highlight=False)


def log_dir() -> Path:
    """Where a command's internal-error logs go: $XDG_STATE_HOME/vlmlab/logs (~/.local/state/vlmlab/logs)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "vlmlab" / "logs"


def internal_error(exc: BaseException) -> NoReturn:
    """The CLI's last line of defence, for anything that is not bad input (bad input is a UserError, exit 2): one
    line and exit 1, the whole traceback in a log file readable by its owner only, redacted like all output (-v also
    prints it here). The message is redacted before it is cut, so a cut never leaves half a secret in view."""
    import typer

    details = redact_text(f"harness {' '.join(sys.argv[1:])}\n{''.join(traceback.format_exception(exc))}")
    path: Path | None = log_dir() / f"harness-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(details)
    except OSError:  # no writable home: the details go to the console instead
        path = None
    first = one_line(redact_text(f"{type(exc).__name__}: {exc}".strip().splitlines()[0]))
    first = first if len(first) <= 300 else first[:297] + "..."
    if path is None or {"-v", "--verbose"} & set(sys.argv[1:]):
        err.print(details, highlight=False)
    where = f"details in {path}" if path else "details above"
    err.print(styled(("internal error:", "bold red"), f" {first} ({where})"), highlight=False)
    raise typer.Exit(code=1) from None


def warn(text: str) -> None:
    err.print(styled(("warning:", "yellow"), " ", one_line(redact_text(text.removeprefix("warning: ")))),
              highlight=False)


def load(config: str | None, overrides: list[str] | None) -> PipelineConfig:
    from runtime.config import load_config  # pydantic's models cost ~0.35 s: not paid by `harness --help`

    return load_config(config, overrides or [])


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def interruptible() -> None:
    """SIGTERM (a scheduler's stop, `kill`) is handled like Ctrl-C."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def disk_full(exc: BaseException) -> str | None:
    """The file (or message) of an out-of-space error, also when it happened inside a Ray worker."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return str(exc.filename or exc)
    text = str(exc)
    if "No space left on device" in text:
        line = next(ln for ln in text.splitlines() if "No space left on device" in ln)
        return line.strip()[:300]
    return None


@contextmanager
def reading_store(uri: str):
    """An MLflow store that cannot be read (unreachable, foreign, not a store) is bad input: one line naming it."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot read MLflow at {uri}: {exc}") from None
