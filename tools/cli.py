"""The `decodekit` command line (click). Each command lives in its own module and calls a library function.

User errors (bad paths, mismatched artifacts, unsupported inputs, missing backends) print one line on
stderr and exit 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from ..errors import UserError  # noqa: F401 - commands raise it; re-exported here

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
    """The error types printed as one line (none of these imports torch or onnx)."""
    from ..errors import BackendError, CheckpointError
    from ..export.config import ConfigError
    from ..export.manifest import ArtifactError

    return ConfigError, CheckpointError, ArtifactError, BackendError, UserError


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="decodekit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.UsageError as e:  # bad option / argument: one line, with the command it concerns
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        click.echo(f"error: {e.format_message()}{where}", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted; nothing half-written was kept", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - only known user errors are shortened
        if isinstance(e, user_errors()):
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
