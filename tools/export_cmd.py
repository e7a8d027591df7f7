"""decodekit export SOURCE -o OUT."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..dtypes import PRECISIONS


@click.command("export")
@click.argument("source")
@click.option("-o", "--out", required=True, type=click.Path(), help="artifact folder to write")
@click.option("--tp", default=1, show_default=True, help="tensor-parallel size (one ONNX file per rank)")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(PRECISIONS))
@click.option("--max-batch", default=8, show_default=True)
@click.option("--max-seq", default=256, show_default=True, help="static KV-cache length")
@click.option("--logits", default="all", show_default=True, type=click.Choice(["all", "last"]))
@click.option("--seed", default=0, show_default=True, help="weight seed for preset:NAME sources")
@click.option("--force", is_flag=True, help="replace a non-empty OUT")
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
def command(source: str, out: str, tp: int, dtype: str, max_batch: int, max_seq: int, logits: str, seed: int,
            force: bool, as_json: bool) -> None:
    """Export SOURCE (a Hugging Face folder or preset:NAME; preset:tiny is the default model) to ONNX."""
    from ..export.folders import check_destination

    check_destination(Path(out), force, keep=[source])  # before importing torch: a refused -o answers at once
    from ..export.artifact import ExportOptions, export_artifact
    from .progress import ProgressBar

    options = ExportOptions(tp=tp, dtype=dtype, max_batch=max_batch, max_seq=max_seq, logits=logits, force=force,
                            seed=seed)
    with ProgressBar("export", quiet=as_json) as bar:
        manifest = export_artifact(source, out, options, progress=bar, written=bar.written)
        bar.finish(out)
    if as_json:
        click.echo(json.dumps(json.loads(manifest.to_json())))
