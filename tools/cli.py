"""The `decodekit` command line (click). Each command lives in its own module and calls a library function.

Exit codes, decided here only: 0 success; 1 a user error (any ``errors.DecodekitError``: bad paths, mismatched
artifacts, unsupported inputs, missing backends) or a failed validation, printed as one line on stderr; 2 a
usage error (unknown option, bad choice: click's convention); 130 Ctrl-C (SIGINT), 143 SIGTERM, after the
partial output folder was removed (export/folders.py). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

import click

from ..errors import DecodekitError, Interrupted, UserError  # noqa: F401 - UserError re-exported

# command name -> module under decodekit.tools defining a click command named `command`
COMMANDS = {
    "export": "export_cmd",
    "optimize": "optimize_cmd",
    "build": "build_cmd",
    "generate": "generate_cmd",
    "chat": "chat_cmd",
    "validate": "validate_cmd",
    "inspect": "inspect_cmd",
    "bench": "bench_cmd",
    "demo": "demo_cmd",
    "launch": "launch_cmd",
    "serve": "serve_cmd",
}


class LazyGroup(click.Group):
    """Commands import only when invoked, so `decodekit --help` never loads torch or tensorrt."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n, m in COMMANDS.items() if importlib.util.find_spec(f"{__package__}.{m}") is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.list_commands(ctx):
            return None
        return importlib.import_module(f"{__package__}.{COMMANDS[name]}").command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="decodekit")
def cli() -> None:
    """Export decoder LLMs to ONNX (explicit KV cache + collectives), optimize, build TensorRT engines, run them."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The error types printed as one line: every subclass of errors.DecodekitError."""
    return (DecodekitError,)


def one_line(message: str) -> str:
    return " | ".join(part.strip() for part in message.strip().splitlines() if part.strip())


def run(argv: list[str] | None = None) -> int:
    """Run one command line; returns the exit code (user errors, usage errors and signals already reported).

    SIGTERM is turned into ``Interrupted`` only while an artifact folder is being written (export/folders.py),
    where there is something to clean up; elsewhere it ends the process at once, as it always did (a rank of
    ``decodekit launch`` blocked in a collective must not wait for the interpreter to stop)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with cli.make_context("decodekit", args) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Exit as e:  # --help, --version, ctx.exit(code)
        return e.exit_code
    except click.exceptions.NoArgsIsHelpError as e:  # a bare `decodekit` / group: the help, as click shows it
        e.show()
        return e.exit_code
    except click.UsageError as e:  # bad option / argument: one line, with the command it concerns
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        click.echo(f"error: {one_line(e.format_message())}{where}", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"error: {one_line(e.format_message())}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except KeyboardInterrupt:
        # a second SIGINT (or one left pending by library code that caught the first) during the message or the
        # interpreter's shutdown would end the process by the signal (-2) instead of this exit code
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        click.echo("interrupted (SIGINT); nothing half-written was kept", err=True)
        return 130
    except Interrupted as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        click.echo(f"terminated (signal {e.signum}); nothing half-written was kept", err=True)
        return e.exit_code
    except DecodekitError as e:
        click.echo(f"error: {one_line(str(e))}", err=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    """The console script: returns on success (callers in Python keep going), else exits with the code."""
    code = run(argv)
    if code in (130, 143):
        # the interrupt is handled and cleaned up; leave without the interpreter's shutdown, which exits by the
        # signal itself (-2) when library code saw the KeyboardInterrupt pass through it (seen with torch.onnx)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
