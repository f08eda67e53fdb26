"""What every command shares: the two consoles, one-line warnings, the config loader, SIGTERM as Ctrl-C."""
from __future__ import annotations

import errno
import signal
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from runtime.errors import UserError
from runtime.secrets import redact_text

if TYPE_CHECKING:
    from runtime.config import PipelineConfig

console = Console()
err = Console(stderr=True, soft_wrap=True)  # messages stay on one line: greppable in logs

CONFIG_HELP = "Preset name in configs/ (default: tiny) or a YAML file."
TRACKING_HELP = "Default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db"
VERBOSE_HELP = ("Also print Ray's, TRL's, lm-eval's and datasets' own output here (it always goes to <run dir>/logs/ "
                "otherwise).")


def error_line(text: str) -> None:
    """``error: <text>`` on stderr, redacted, markup-free: the one line a user gets for bad input."""
    err.print(f"[bold red]error:[/] {escape(redact_text(text))}", highlight=False)


def warn(text: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(redact_text(text.removeprefix('warning: ')))}", highlight=False)


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
