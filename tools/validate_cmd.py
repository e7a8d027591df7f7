"""decodekit validate ARTIFACT [--backends torch,ort,...] [--steps N] [--prompt TEXT | --ids ...] [--json]."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from ..errors import UserError
from .validate import MODES
from .validate_judge import describe as describe_judge
from .verify_option import verify_option

if TYPE_CHECKING:
    from .validate import ValidationReport

KNOWN_BACKENDS = ("torch", "ort", "tensorrt")


def parse_ids(values: tuple[str, ...]) -> list[list[int]]:
    out = []
    for v in values:
        try:
            ids = [int(t) for t in v.replace(" ", "").split(",") if t != ""]
        except ValueError:
            raise UserError(f"--ids takes comma-separated integers like 1,2,3; got {v!r}") from None
        if not ids:
            raise UserError("--ids got an empty list; pass token ids like 1,2,3")
        out.append(ids)
    return out


def parse_backends(text: str, minimum: int = 2) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    for b in names:
        name = b.partition("@")[0]
        if name not in KNOWN_BACKENDS:
            raise UserError(f"unknown backend {name!r} in --backends; choose from {', '.join(KNOWN_BACKENDS)} "
                            f"(optionally NAME@ARTIFACT for another artifact of the same model)")
    if len(names) < minimum:
        raise UserError("--backends needs at least two backends, the reference first (e.g. torch,ort)" if minimum > 1
                        else "--backends needs at least one backend (e.g. ort)")
    return names


@click.command("validate")
@verify_option
@click.argument("artifact", type=click.Path())
@click.option("--backends", default="torch,ort", show_default=True,
              help="comma-separated; the first is the reference. NAME or NAME@ARTIFACT (e.g. ort@./tiny-gqa)")
@click.option("--steps", default=8, show_default=True, help="decode steps after the prefill")
@click.option("--prompt", "prompts", multiple=True, help="prompt text (repeatable); needs the artifact's tokenizer")
@click.option("--ids", "ids", multiple=True, help="prompt token ids, comma-separated (repeatable)")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="device of the torch and ort backends")
@click.option("--reference", default="decodekit", show_default=True, type=click.Choice(["decodekit", "transformers"]),
              help="decodekit: the first backend is the reference; transformers: transformers' own model on the "
                   "artifact's Hugging Face source (fp32, eager) is, and every backend is compared with it")
@click.option("--reference-source", default=None,
              help="the artifact's source (Hugging Face folder or preset:NAME) when the manifest's has moved: "
                   "rebuilds the torch backend and the transformers reference from it")
@click.option("--save-results", type=click.Path(), default=None,
              help="save the per-step logits as Polygraphy RunResults JSON "
                   "(then e.g. `polygraphy run --load-outputs PATH --check-error-stat max --atol 1e-4`)")
@click.option("--mode", default="tolerance", show_default=True, type=click.Choice(MODES),
              help="tolerance: the dtype's logit tolerance; parity: identical greedy tokens for every step; judge: "
                   "every backend against an fp32 judge (the reference's weights upcast), teacher-forced: passes "
                   "when a candidate's logit error is within 2x the reference's own (a near-tie, not a kernel error)")
@click.option("--no-bisect", is_flag=True, help="do not bisect a failing backend to the first diverging layer")
@click.option("--seed", default=0, show_default=True, help="seed of the default random prompts")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON document")
def command(artifact: str, backends: str, steps: int, prompts: tuple[str, ...], ids: tuple[str, ...], device: str,
            reference: str, reference_source: str | None, save_results: str | None, mode: str, no_bisect: bool,
            seed: int, as_json: bool) -> None:
    """Run the same prompts through several backends and compare logits step by step (exit 1 on a mismatch).

    All backends are fed the reference's greedy tokens (teacher forcing). --reference transformers makes
    transformers' own model on the artifact's Hugging Face source the reference (needs transformers).
    Tolerances: fp32 max |logit error| <= 1e-4 x max(1, logit scale) and identical greedy tokens; fp16 top-1
    >= 0.99 and cosine >= 0.999; bf16 top-1 >= 0.98 and cosine >= 0.995 (--mode tolerance; see --mode for
    parity and judge). A failing ONNX backend is bisected to the first diverging layer.
    """
    from .validate import validate

    if prompts and ids:
        raise UserError("pass --prompt TEXT or --ids 1,2,3, not both")
    names = parse_backends(backends, 2 if reference == "decodekit" else 1)
    report = validate(artifact, names, parse_ids(ids) if ids else None, steps, texts=prompts,
                      device=device, reference_source=reference_source, bisect=not no_bisect,
                      save_results=save_results, seed=seed, reference=reference, mode=mode,
                      progress=lambda m: click.echo(f"[validate] {m}", err=True))
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo(format_report(report))
    if not report.passed:
        click.echo(f"error: validation failed: {failure_line(report)}", err=True)
        sys.exit(1)


def failure_line(report: "ValidationReport") -> str:
    parts = []
    for c in report.comparisons:
        if c.passed:
            continue
        text = f"{c.backend} vs {c.reference}: {c.reasons[0]}"
        if c.bisect and c.bisect.get("found"):
            text += f"; bisect: {c.bisect['message']}"
        parts.append(text)
    return " | ".join(parts)


def format_report(report: "ValidationReport", per_step: bool = True) -> str:
    lines = [f"validate {report.artifact} ({report.dtype}; {len(report.prompts)} prompts of "
             f"{', '.join(str(len(p)) for p in report.prompts)} tokens; prefill + {report.steps} decode steps; "
             f"reference {report.reference}; mode {report.mode}; {report.seconds:.1f} s)"]
    lines += [f"note: {n}" for n in report.notes]
    for c in report.comparisons:
        lines.append(f"\n{c.backend} vs {c.reference}  [{c.tolerance.describe()}]")
        if per_step:
            lines.append(f"  {'step':>4} {'pos':>4} {'max_abs':>10} {'max_rel':>10} {'cos_min':>10} {'top1':>6}  ok")
            for m in c.steps:
                lines.append(f"  {m.step:>4} {m.positions:>4} {m.max_abs:>10.3g} {m.max_rel:>10.3g} "
                             f"{m.cosine_min:>10.6f} {m.top1_agreement:>6.3f}  {'yes' if m.passed else 'NO'}")
        g = c.greedy
        where = "identical" if g.match else \
            f"first differ at prompt {g.first_divergence[0]}, token {g.first_divergence[1]}"
        lines.append(f"  greedy tokens: {where} (agreement {g.agreement:.3f})")
        s = c.summary()
        lines.append(f"  {'PASS' if c.passed else 'FAIL'}: max abs {s['max_abs']:.3g}, max rel {s['max_rel']:.3g}, "
                     f"cosine >= {s['cosine_min']:.6f}, top-1 {s['top1_agreement']:.3f}"
                     + ("" if c.passed else "; " + "; ".join(c.reasons)))
        if c.judge is not None:
            lines += describe_judge(c.judge, c.reference, c.backend)
        if c.bisect is not None:
            lines.append(f"  bisect (prompt {c.bisect.get('prompt', 0)}, replayed alone): {c.bisect['message']}")
            lines += [f"    note: {n}" for n in c.bisect.get("notes", [])]
    if report.saved_results:
        lines.append(f"\nsaved Polygraphy RunResults to {report.saved_results} "
                     f"(polygraphy inspect data {report.saved_results})")
    lines.append(f"\nRESULT: {'PASS' if report.passed else 'FAIL'}")
    return "\n".join(lines)
