"""decodekit chat ARTIFACT: an interactive chat (stdin lines in, streamed answers out), history in the KV cache."""

from __future__ import annotations

import sys

import click

from ..errors import UserError
from .generate_cmd import _sampling

EXIT = "/exit"


@click.command("chat")
@click.argument("artifact")
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["torch", "ort"]))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--system", default=None, help="system message (default: the template's own, if it has one)")
@click.option("--max-new-tokens", default=256, show_default=True, help="per answer")
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy")
@click.option("--top-k", default=0, show_default=True, help="0 = off")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--min-p", default=0.0, show_default=True)
@click.option("--repetition-penalty", default=1.0, show_default=True)
@click.option("--seed", default=None, type=int, help="sampling seed (reproducible draws)")
def command(artifact: str, backend: str, device: str, system: str | None, max_new_tokens: int, temperature: float,
            top_k: int, top_p: float, min_p: float, repetition_penalty: float, seed: int | None) -> None:
    """Chat with ARTIFACT: one message per stdin line, `/exit` or end of input ends; works from a pipe too."""
    from ..runtime.chat import ChatSession
    from ..runtime.chat_template import ChatTemplate
    from ..runtime.pipeline import open_backend
    from ..runtime.tokenizer import Tokenizer, generation_eos_ids

    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    sampling = _sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                         repetition_penalty=repetition_penalty, seed=seed)
    interactive = sys.stdin.isatty()
    with open_backend(artifact, backend, device=device) as runner:
        tok = Tokenizer.from_artifact(runner.artifact, runner.manifest)
        if tok is None:
            raise UserError(f"{artifact}: the artifact has no tokenizer; chat needs one")
        template = ChatTemplate.from_artifact(runner.artifact, runner.manifest)
        end_ids = template.end_of_turn_ids(tok, generation_eos_ids(runner.artifact, runner.manifest))
        session = ChatSession(runner, tok, template, end_ids, sampling, max_new_tokens, system)
        if interactive:
            click.echo(f"[chat] {artifact}: type a message, {EXIT} or Ctrl-D to end", err=True)
        for line in _lines(interactive):
            if line == EXIT:
                break
            turn = session.send(line, on_text=_write)
            click.echo()
            if interactive:
                click.echo(f"[chat] {len(turn.ids)} tokens ({turn.finish_reason}); {turn.appended} prompt tokens "
                           f"appended, cache {turn.cached}/{session.max_seq}", err=True)


def _lines(interactive: bool):
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
