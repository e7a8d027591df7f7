"""`--verify always|auto|never`: the checksum policy of the commands that open artifacts (export/verify_cache.py)."""

from __future__ import annotations

from typing import Callable, TypeVar

import click

F = TypeVar("F", bound=Callable)


def _set(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        from ..export import verify_cache

        verify_cache.set_mode(value)
    return value


def verify_option(f: F) -> F:
    """Add --verify to a command; it sets the process-wide mode before the command body runs."""
    return click.option(
        "--verify", type=click.Choice(["always", "auto", "never"]), default=None, expose_value=False,
        callback=_set, is_eager=True,
        help="check the artifact's file checksums: always (hash every file), auto (default: skip files verified "
             "before and unchanged since, per the cache in ~/.cache/decodekit) or never (sizes only)")(f)
