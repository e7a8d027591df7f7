"""decodekit inspect PATH [--json]: an artifact folder, an .onnx file or a TensorRT .engine file.

Exit 1 when the artifact fails verification (the report is still printed, with what was found)."""

from __future__ import annotations

import json

import click

from .verify_option import verify_option


@click.command("inspect")
@verify_option
@click.argument("path", type=click.Path())
@click.option("--no-verify", is_flag=True, help="skip the checksum check of the artifact's files")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON document")
def command(path: str, no_verify: bool, as_json: bool) -> None:
    """Manifest, graph I/O, op histogram, parameters, KV-cache memory, collectives and engine layers of PATH."""
    from ..errors import ArtifactError
    from .inspect_artifact import failed_verification, format_inspect, inspect_path

    report = inspect_path(path, verify=not no_verify)
    click.echo(json.dumps(report.to_dict()) if as_json else format_inspect(report))
    failure = failed_verification(report)
    if failure is not None:  # the report above says what was found; exit 1 with the failure as the one error line
        raise ArtifactError(failure)
