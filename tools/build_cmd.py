"""decodekit build ARTIFACT -o OUT: one TensorRT engine per rank, in a new artifact folder."""

from __future__ import annotations

import json

import click

from .verify_option import verify_option


@click.command("build")
@verify_option
@click.argument("artifact", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="new artifact folder (input files + engines)")
@click.option("--backend", default="tensorrt", show_default=True, type=click.Choice(["tensorrt"]))
@click.option("--opt-seq", type=int, default=None, help="prefill profile's optimal seq [default: min(128, max_seq)]")
@click.option("--opt-batch", type=int, default=1, show_default=True, help="profiles' optimal batch")
@click.option("--max-batch", type=int, default=None, help="largest batch the engine takes [default: the artifact's]")
@click.option("--profiles", default="split", show_default=True, type=click.Choice(["split", "single"]),
              help="split: decode (seq=1) + prefill (seq 1..max_seq) profiles; single: one profile for both")
@click.option("--timing-cache", type=click.Path(), default=None,
              help="timing cache file reused across builds [default: ~/.cache/decodekit/; TensorRT-RTX has none]")
@click.option("--strict-attention", is_flag=True, help="fail instead of decomposing attention without a fused kernel")
@click.option("--workspace-mib", type=int, default=None, help="builder workspace limit")
@click.option("--verbose-log", is_flag=True, help="keep TensorRT's verbose messages in build.log")
@click.option("--force", is_flag=True, help="replace a non-empty OUT")
@click.option("--json", "as_json", is_flag=True, help="print the new manifest as JSON")
def command(artifact: str, out: str, backend: str, opt_seq: int | None, opt_batch: int, max_batch: int | None,
            profiles: str, timing_cache: str | None, strict_attention: bool, workspace_mib: int | None,
            verbose_log: bool, force: bool, as_json: bool) -> None:
    """Build TensorRT engines (full TensorRT or TensorRT-RTX) for every rank of ARTIFACT into OUT."""
    from ..graphs.trt.build import BuildOptions, build_engines
    from .progress import ProgressBar

    options = BuildOptions(backend=backend, opt_seq=opt_seq, opt_batch=opt_batch, max_batch=max_batch,
                           profiles=profiles, timing_cache=timing_cache, decomposable_attention=not strict_attention,
                           workspace_mib=workspace_mib, verbose_log=verbose_log, force=force)
    with ProgressBar("build", quiet=as_json) as bar:
        manifest = build_engines(artifact, out, options, progress=bar)
        bar.finish(out)
    if as_json:
        click.echo(json.dumps(json.loads(manifest.to_json())))
