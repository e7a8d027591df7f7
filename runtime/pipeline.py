"""Text in, text out: ``generate_text`` = tokenizer + backend + decode loop (what `decodekit generate` calls)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .backend import Backend, BackendError, load_backend
from .generate import GenerationResult, generate
from .sampler import SamplingConfig
from .stopping import GenerationError
from .tokenizer import Tokenizer, generation_eos_ids

BACKEND_PACKAGES = {"torch": "torch", "onnxruntime": "onnxruntime", "tensorrt": "tensorrt",
                    "tensorrt_rtx": "tensorrt-rtx"}


def open_backend(artifact: str | Path, backend: str = "ort", **options: Any) -> Backend:
    """``load_backend`` with a missing backend module or package reported as a BackendError."""
    try:
        return load_backend(backend, artifact, **options)
    except ModuleNotFoundError as e:
        if e.name in BACKEND_PACKAGES:
            raise BackendError(f"the {backend} backend needs the {e.name} package: "
                               f"pip install {BACKEND_PACKAGES[e.name]}") from None
        if e.name and e.name.startswith(f"{__package__}."):
            raise BackendError(f"the {backend} backend is not part of this decodekit installation") from None
        raise


def generate_text(artifact: str | Path | Backend, prompts: str | Sequence[str] = (), *,
                  prompt_ids: Sequence[Sequence[int]] | None = None, max_new_tokens: int = 64,
                  sampling: SamplingConfig = SamplingConfig(), stop: Sequence[str] = (),
                  stop_ids: Sequence[Sequence[int]] = (), eos_ids: Iterable[int] | None = None,
                  backend: str = "ort", backend_options: dict[str, Any] | None = None,
                  on_text: Callable[[int, str], None] | None = None,
                  on_token: Callable[[int, int], None] | None = None) -> GenerationResult:
    """Generate from text ``prompts`` (needs the artifact's tokenizer) or from ``prompt_ids``.

    artifact: an artifact folder (opened with ``backend`` / ``backend_options`` and closed at the end) or an
    open Backend. eos_ids: None = config.json + generation_config.json EOS ids. stop: stop strings, matched
    as token sequences (their tokenization without special tokens). on_text(b, piece) streams decoded text,
    on_token(b, id) streams ids, both as each step is generated. Returns ids, logprobs, finish reasons and,
    with a tokenizer, the decoded texts.
    """
    own = not isinstance(artifact, Backend)
    runner = open_backend(artifact, backend, **(backend_options or {})) if own else artifact
    try:
        tok = Tokenizer.from_artifact(runner.artifact, runner.manifest)
        ids = _prompt_ids(tok, [prompts] if isinstance(prompts, str) else list(prompts), prompt_ids)
        stops = [*map(list, stop_ids), *_stop_ids(tok, stop)]
        eos = generation_eos_ids(runner.artifact, runner.manifest) if eos_ids is None else tuple(eos_ids)
        events = generate(runner, ids, max_new_tokens, sampling, eos_ids=eos, stop_sequences=stops)
        result = GenerationResult.collect(ids, _stream(events, tok, len(ids), on_text, on_token))
    finally:
        if own:
            runner.close()
    if tok is None:
        return result
    return GenerationResult(result.prompt_ids, result.output_ids, result.logprobs, result.finish_reasons,
                            result.steps, [tok.decode(o) for o in result.output_ids])


def _prompt_ids(tok: Tokenizer | None, prompts: list[str], prompt_ids: Sequence[Sequence[int]] | None):
    if bool(prompts) == (prompt_ids is not None):
        raise GenerationError("pass either text prompts or prompt ids (exactly one of them)")
    if prompt_ids is not None:
        return [[int(t) for t in p] for p in prompt_ids]
    if tok is None:
        raise GenerationError("this artifact has no tokenizer, so text prompts cannot be encoded; "
                              "pass token ids instead (--ids 1,2,3)")
    return [tok.encode(p) for p in prompts]


def _stop_ids(tok: Tokenizer | None, stop: Sequence[str]) -> list[list[int]]:
    if stop and tok is None:
        raise GenerationError("stop strings need the artifact's tokenizer, which this artifact lacks")
    out = [tok.encode(s, add_special_tokens=False) for s in stop] if tok else []
    if any(not ids for ids in out):
        raise GenerationError("a stop string is empty or encodes to no tokens")
    return out


def _stream(events, tok: Tokenizer | None, batch: int, on_text, on_token):
    streams = [tok.stream() for _ in range(batch)] if tok is not None and on_text is not None else None
    for ev in events:
        for b, t in ev.new_tokens().items():
            if on_token is not None:
                on_token(b, t)
            if streams is not None and (piece := streams[b].push(t)):
                on_text(b, piece)
        yield ev
    if streams is not None:
        for b, s in enumerate(streams):
            if piece := s.flush():
                on_text(b, piece)
