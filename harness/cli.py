"""`harness`: the command line. Each command is a module of harness/commands/, registered here in one line.

This is also the one place where bad input becomes what a user sees: a `UserError` raised by any command (or by
anything under it) is printed as one line (`error: ...`, redacted, markup off) and exits 2; a usage error
(unknown command or option, bad option value) likewise, instead of click's usage box. Anything else is a bug of
vlmlab's or of a library: one `internal error:` line, exit 1, the traceback in a log file (harness/commands/common.py
internal_error), never a traceback box.
"""
from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from harness.commands import (
    compare,
    env,
    estimate,
    gc,
    leaderboard,
    report,
    reproduce,
    run,
    runs,
    sweep,
    sync,
    ui,
    validate,
)
from harness.commands import eval as eval_command
from harness.commands.common import error_line, internal_error
from runtime.errors import UserError
from runtime.secrets import RedactingStream

try:  # typer 0.29 carries its own click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError


class _Commands(TyperGroup):
    """Bad input of every command, on one line and exit 2."""

    def make_context(self, info_name, args, *rest, **kwargs):
        self._argv = list(args)  # what the user typed: an OSError on one of these paths is bad input (invoke)
        try:
            return super().make_context(info_name, args, *rest, **kwargs)
        except NoArgsIsHelpError:
            raise
        except UsageError as exc:
            self._usage(exc)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError:
            raise
        except UsageError as exc:  # a subcommand's unknown option, bad option value
            self._usage(exc)
        except UserError as exc:
            error_line(str(exc))
            raise typer.Exit(code=2) from None
        except (typer.Exit, typer.Abort, ClickException):  # a command's own exit code; Ctrl-C at a prompt
            raise
        except OSError as exc:
            typed = _typed_path(exc, getattr(self, "_argv", []))
            if typed is None:
                internal_error(exc)
            error_line(f"{typed}: {exc.strerror or type(exc).__name__}; give a path this system can open")
            raise typer.Exit(code=2) from None
        except Exception as exc:
            internal_error(exc)

    @staticmethod
    def _usage(exc: UsageError):
        where = exc.ctx.command_path if exc.ctx else "harness"
        error_line(f"{where}: {exc.format_message()} (see `{where} --help`)")
        raise typer.Exit(code=2) from None


def _typed_path(exc: OSError, argv: list[str]) -> str | None:
    """The command-line path (an argument, or an option's or override's value) that ``exc`` is about: the path
    itself or a file below it. None where the error is about a path the user did not give (a bug, not bad input)."""
    if exc.filename is None:
        return None
    failed = os.fsdecode(exc.filename)
    for token in argv:
        value = token.partition("=")[2] if token.startswith("-") or "=" in token else token
        for given in {token, value} - {""}:
            try:
                full = os.path.abspath(os.path.expanduser(given))
            except (ValueError, OSError):
                full = given
            if failed in (given, full) or failed.startswith((full.rstrip("/") + "/", given.rstrip("/") + "/")):
                return given
    return None


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


app.command()(run.run)
app.command("eval")(eval_command.eval_)
app.command()(reproduce.reproduce)
app.command()(sweep.sweep)
app.command()(leaderboard.leaderboard)
app.command()(compare.compare)
app.command()(runs.runs)
app.command()(report.report)
app.command()(ui.ui)
app.command()(sync.sync)
app.command()(validate.validate)
app.command()(gc.gc)
app.command()(env.env)
app.command()(estimate.estimate)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
