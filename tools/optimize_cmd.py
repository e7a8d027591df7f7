"""decodekit optimize ARTIFACT -o OUT --dialect std|ort-gqa|decomposed [--dtype fp16|bf16]."""

from __future__ import annotations

import json

import click


@click.command("optimize")
@click.argument("artifact", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="new artifact folder to write")
@click.option("--dialect", required=True, help="target dialect: std, ort-gqa, ort-gqa-uniform (onnxruntime < 1.32) or decomposed")
@click.option("--dtype", default=None, type=click.Choice(["fp32", "fp16", "bf16"]),
              help="convert weights, activations, KV cache and logits (default: keep the artifact's)")
@click.option("--debug", is_flag=True, help="also report why each rewrite rule did not match where it came closest")
@click.option("--force", is_flag=True, help="replace a non-empty OUT")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON document")
def command(artifact: str, out: str, dialect: str, dtype: str | None, debug: bool, force: bool, as_json: bool) -> None:
    """Fold, fuse and lower ARTIFACT's graphs into DIALECT (and DTYPE), writing a new artifact at OUT."""
    from ..graphs.pipeline import optimize

    _, report = optimize(artifact, out, dialect, dtype, debug=debug, force=force,
                         progress=lambda m: click.echo(f"[optimize] {m}", err=True))
    if as_json:
        click.echo(json.dumps(report))
        return
    for rank in report["ranks"]:
        for p in rank["passes"]:
            counts = {k: v for k, v in p["counts"].items() if v}
            click.echo(f"rank{rank['rank']} {p['name']:<18} {json.dumps(counts)}  ({p['seconds']:.2f} s)")
            for rule, reasons in p.get("why_not", {}).items():
                for reason in reasons:
                    click.echo(f"    {rule} did not match {reason}")
    click.echo(f"{report['artifact']}: {report['dialect']} {report['dtype']} {json.dumps(report['counts'])}")
