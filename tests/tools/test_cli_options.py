"""Every command's option defaults are valid values of their own types. click < 8.2 compares a Choice default
with the (string) choices as written, so `default=32` for choices "16".."256" failed every invocation of
`decodekit optimize` with click 8.1 (pyproject allows click >= 8.1); this catches that class for any version."""

from __future__ import annotations

import importlib

import click
import pytest

from decodekit.tools.cli import COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_choice_defaults_are_listed_choices(name):
    command = importlib.import_module(f"decodekit.tools.{COMMANDS[name]}").command
    for param in command.params:
        if isinstance(param.type, click.Choice) and param.default is not None:
            defaults = param.default if param.multiple else (param.default,)
            for d in defaults:
                assert isinstance(d, str) and d in param.type.choices, \
                    f"decodekit {name} {param.opts[0]}: default {d!r} is not one of {list(param.type.choices)}"
