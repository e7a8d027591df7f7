"""decodekit bench ARTIFACT."""

from __future__ import annotations

import json

import click

from .verify_option import verify_option


@click.command("bench")
@verify_option
@click.argument("artifact", type=click.Path())
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "torch", "tensorrt"]))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--batch", default=1, show_default=True)
@click.option("--prompt-len", default=32, show_default=True)
@click.option("--new-tokens", default=128, show_default=True)
@click.option("--threads", default=0, help="ORT intra-op threads (0 = default)")
@click.option("--json", "as_json", is_flag=True)
def command(artifact: str, backend: str, device: str, batch: int, prompt_len: int, new_tokens: int, threads: int,
            as_json: bool) -> None:
    """Prefill tokens/s, decode ms/token (median after warm-up) and the fraction of the memory roofline."""
    from .bench import bench_artifact

    options = {"intra_op_threads": threads} if threads and backend == "ort" else {}
    click.echo(f"[bench] {backend} on {device}, batch {batch}, {prompt_len}-token prompt, {new_tokens} new tokens",
               err=True)
    r = bench_artifact(artifact, backend, device, batch, prompt_len, new_tokens, backend_options=options)
    if as_json:
        click.echo(json.dumps(r.to_dict()))
        return
    click.echo(f"prefill  {r.prefill_ms:9.2f} ms   {r.prefill_tokens_per_s:10.1f} tokens/s")
    click.echo(f"decode   {r.decode_ms_per_token:9.3f} ms/step {r.decode_tokens_per_s:8.1f} tokens/s")
    click.echo(f"roofline {r.roofline_fraction * 100:8.1f} %  ({r.bytes_per_step / 1e6:.1f} MB/step at "
               f"{r.bandwidth_Bps / 1e9:.1f} GB/s measured)")
