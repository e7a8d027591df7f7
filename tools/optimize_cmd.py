"""decodekit optimize ARTIFACT -o OUT --dialect std|ort-gqa|ort-gqa-uniform|ort-gqa-static|decomposed|trt
[--dtype fp16|bf16] [--quantize int4|int8 ...]."""

from __future__ import annotations

import json

import click

from ..dtypes import PRECISIONS
from .verify_option import verify_option


@click.command("optimize")
@verify_option
@click.argument("artifact", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="new artifact folder to write")
@click.option("--dialect", required=True, help="target dialect: std, ort-gqa, ort-gqa-uniform or ort-gqa-static (onnxruntime < 1.32; -static for CUDA graphs), decomposed, or trt (TensorRT: soft-capped attention decomposed)")
@click.option("--dtype", default=None, type=click.Choice(PRECISIONS),
              help="convert weights, activations, KV cache and logits (default: keep the artifact's)")
@click.option("--quantize", "quant", default=None, type=click.Choice(["int4", "int8"]),
              help="weight-only blockwise quantization of the linear layers (embeddings and norms kept; the LM head "
                   "per format, see --quantize-lm-head)")
@click.option("--block-size", default="32", show_default=True, type=click.Choice(["16", "32", "64", "128", "256"]),
              help="quantization block length along K")
@click.option("--symmetric/--asymmetric", default=None,
              help="zero point 2^(bits-1) or per block (default: the format's best, see --quant-method)")
@click.option("--quant-method", default=None, type=click.Choice(["rtn", "search"]),
              help="rtn: round to nearest; search: error-minimizing scale search per block  [default: rtn]")
@click.option("--float-zero-points/--int-zero-points", default=None,
              help="asymmetric MatMulNBits: the block's min/max grid (float zero points). Default per "
                   "format: ort asymmetric + float zero points, qdq symmetric (TensorRT takes symmetric only)")
@click.option("--float-zp-form", default=None, type=click.Choice(["offsets", "input"]),
              help="how float zero points reach MatMulNBits: offsets = the integer kernel + an exact per-block offset "
                   "term (fast); input = the kernel's float zero_points input (onnxruntime's slow path)  [default: offsets]")
@click.option("--quantize-lm-head/--no-quantize-lm-head", default=None,
              help="quantize the LM head too (a tied one keeps the float table for the embedding lookup). Default per "
                   "format: ort yes, 8-bit (see --lm-head-bits); qdq no")
@click.option("--lm-head-bits", default=None, type=click.Choice(["4", "8"]),
              help="the LM head's width when it differs from --quantize's: symmetric, scale absmax/(2^(bits-1)-1) "
                   "(8: llama.cpp's Q8_0 grid)  [default: ort 8]")
@click.option("--quant-format", default="ort", show_default=True, type=click.Choice(["ort", "qdq"]),
              help="ort: com.microsoft MatMulNBits (ONNX Runtime); qdq: blocked DequantizeLinear -> MatMul (TensorRT)")
@click.option("--accuracy-level", default=None, type=click.IntRange(0, 4),
              help="MatMulNBits accuracy_level (4 = int8 activations in ORT's CPU kernel, 0 = float; default: 4)")
@click.option("--fuse-projections/--no-fuse-projections", default=True, show_default=True,
              help="one MatMul (+ Split) per group of sibling projections (q/k/v, gate/up) reading one activation")
@click.option("--debug", is_flag=True, help="also report why each rewrite rule did not match where it came closest")
@click.option("--force", is_flag=True, help="replace a non-empty OUT")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON document")
def command(artifact: str, out: str, dialect: str, dtype: str | None, quant: str | None, block_size: str,
            symmetric: bool | None, quant_method: str | None, float_zero_points: bool | None,
            float_zp_form: str | None, quantize_lm_head: bool | None, lm_head_bits: str | None, quant_format: str,
            accuracy_level: int | None,
            fuse_projections: bool, debug: bool, force: bool, as_json: bool) -> None:
    """Fold, fuse and lower ARTIFACT's graphs into DIALECT (and DTYPE), writing a new artifact at OUT."""
    from ..graphs.passes.quantize import default_quant_options
    from ..graphs.pipeline import PassOptions, optimize

    from .progress import ProgressBar

    quantize = None if quant is None else default_quant_options(
        int(quant[3:]), quant_format, block_size=int(block_size), symmetric=symmetric, method=quant_method,
        float_zero_points=False if symmetric else float_zero_points, float_zp_form=float_zp_form,
        lm_head=quantize_lm_head, lm_head_bits=None if lm_head_bits is None else int(lm_head_bits),
        accuracy_level=accuracy_level)
    with ProgressBar("optimize", quiet=as_json) as bar:
        _, report = optimize(artifact, out, dialect, dtype, debug=debug, force=force, progress=bar, quantize=quantize,
                             options=PassOptions(fuse_projections=fuse_projections))
        bar.finish(out)
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
    scheme = f" {report['quantization']}" if report.get("quantization") else ""
    click.echo(f"{report['artifact']}: {report['dialect']} {report['dtype']}{scheme} {json.dumps(report['counts'])}")
