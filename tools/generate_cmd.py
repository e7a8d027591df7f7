"""decodekit generate ARTIFACT (--prompt TEXT | --ids 1,2,3) ..."""

from __future__ import annotations

import json
import sys
import time

import click

from .verify_option import verify_option

from ..errors import UserError


def _parse_ids(values: tuple[str, ...]) -> list[list[int]]:
    out = []
    for v in values:
        try:
            out.append([int(t) for t in v.replace(" ", "").split(",") if t != ""])
        except ValueError:
            raise UserError(f"--ids takes comma-separated integers like 1,2,3; got {v!r}") from None
    return out


def _sampling(**kw):
    from ..runtime.sampler import SamplingConfig

    try:
        return SamplingConfig(**kw)
    except ValueError as e:
        raise UserError(f"bad sampling option: {e}") from None


@click.command("generate")
@verify_option
@click.argument("artifact")
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["torch", "ort", "tensorrt"]))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--cuda-graph/--no-cuda-graph", default=None,
              help="ort on cuda: replay the decode step as a CUDA graph (default: where the dialect allows it)")
@click.option("--prompt", "prompts", multiple=True, help="prompt text (repeat for a batch); needs the artifact's tokenizer")
@click.option("--ids", "ids", multiple=True, help="prompt token ids, comma-separated (repeat for a batch)")
@click.option("--chat", "chat", default=None, help="a user message, wrapped in the model's chat template")
@click.option("--system", default=None, help="with --chat: the system message")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy")
@click.option("--top-k", default=0, show_default=True, help="0 = off")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--min-p", default=0.0, show_default=True)
@click.option("--repetition-penalty", default=1.0, show_default=True)
@click.option("--presence-penalty", default=0.0, show_default=True)
@click.option("--frequency-penalty", default=0.0, show_default=True)
@click.option("--seed", default=None, type=int, help="sampling seed (reproducible draws)")
@click.option("--stop", multiple=True, help="stop string (repeatable), matched as a token sequence")
@click.option("--logprobs", is_flag=True, help="compute each token's log-probability (in --json as \"logprobs\")")
@click.option("--json", "as_json", is_flag=True,
              help='print one JSON document {"tokens": [[...]], "text": [...], "finish_reasons": [...]}')
def command(artifact: str, backend: str, device: str, cuda_graph: bool | None, prompts: tuple[str, ...],
            ids: tuple[str, ...], chat: str | None, system: str | None, max_new_tokens: int, temperature: float,
            top_k: int, top_p: float, min_p: float, repetition_penalty: float, presence_penalty: float,
            frequency_penalty: float, seed: int | None, stop: tuple[str, ...], logprobs: bool, as_json: bool) -> None:
    """Generate tokens from ARTIFACT for --prompt texts, --ids token lists or one --chat message; streams a single
    prompt's text.

    Started by torchrun (RANK / WORLD_SIZE set) on a tensor-parallel artifact, each process is one rank:
    ``torchrun --nproc-per-node 2 -m decodekit generate ARTIFACT --ids 1,2,3``."""
    from ..runtime.launch import launched
    from ..runtime.pipeline import generate_text, open_backend

    if launched():  # one rank of a tensor-parallel run; rank 0 prints, as `decodekit launch` does
        from ..runtime.launch import DEFAULT_TIMEOUT_S, generate_worker
        from .launch_cmd import _request

        if backend != "ort":
            raise UserError("under torchrun, generate runs the ort backend (one process per rank); drop --backend")
        generate_worker(artifact, _request(DEFAULT_TIMEOUT_S, 0, prompts=prompts, ids=ids, chat=chat, system=system,
                                           max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                           top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                                           presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                           seed=seed, stop=stop, as_json=as_json, device=device,
                                           cuda_graph=cuda_graph, logprobs=logprobs))
        return
    if (chat is not None) + bool(prompts) + bool(ids) != 1:
        raise UserError("pass one of --prompt TEXT, --ids 1,2,3 (repeatable for a batch) or --chat MESSAGE")
    if system is not None and chat is None:
        raise UserError("--system goes with --chat MESSAGE")
    prompt_ids = _parse_ids(ids) if ids else None
    sampling = _sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                         repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                         frequency_penalty=frequency_penalty, seed=seed, logprobs=logprobs)
    options = {"device": device} if backend in ("torch", "ort") else {}
    if cuda_graph is not None:
        if backend != "ort" or device != "cuda":
            raise UserError("--cuda-graph / --no-cuda-graph apply to --backend ort --device cuda only")
        options["cuda_graph"] = cuda_graph
    started = time.perf_counter()
    with open_backend(artifact, backend, **options) as runner:
        has_text = any(f.file == "tokenizer.json" for f in runner.manifest.tokenizer)
        eos_ids = None
        if chat is not None:
            from ..runtime.chat_template import chat_prompt

            ids_, eos_ids = chat_prompt(runner.artifact, runner.manifest, chat, system)
            prompt_ids, ids = [ids_], (chat,)
        stream = len(prompts) + len(ids) == 1 and not as_json
        result = generate_text(runner, list(prompts), prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                               sampling=sampling, stop=list(stop), eos_ids=eos_ids,
                               on_text=_write if stream and has_text else None,
                               on_token=(lambda b, t: _write(b, f"{t} ")) if stream and not has_text else None)
    seconds = time.perf_counter() - started
    if as_json:
        texts = result.text or [None] * len(result.output_ids)
        doc = {"tokens": result.output_ids, "text": texts, "finish_reasons": result.finish_reasons}
        if logprobs:
            doc["logprobs"] = result.logprobs
        click.echo(json.dumps(doc))
        return
    if stream:
        click.echo()
    else:
        for b, out in enumerate(result.output_ids):
            click.echo(f"[{b}] " + (result.text[b] if result.text else " ".join(map(str, out))))
    n = sum(len(o) for o in result.output_ids)
    click.echo(f"[generate] {n} tokens in {seconds:.2f} s; finish: {', '.join(result.finish_reasons)}", err=True)


def _write(b: int, piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
