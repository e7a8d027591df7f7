"""python -m decodekit: the command line."""

from .tools.cli import main

main()
