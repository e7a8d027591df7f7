"""The decode loop, one for every backend: one right-padded prefill for the whole batch, then decode steps
that stay on the backend's device (runtime/decode_step.py).

    prefill: input_ids_BS (right-padded), position_ids = arange(S), write_indices = 0, nonpad = len_b
    decode:  input_ids_B1 = last token, position_ids = write_indices = len_b, nonpad = len_b + 1, advanced on
             the device by the step itself

``generate`` checks the request up front (``Backend.check_request`` raises GenerationError before any work),
then returns an iterator of ``StepEvent``s, one per generated position, so callers can stream. On CUDA the host
is one step behind the device: it launches step k+1 before it reads the tokens of step k (through pinned memory
and an event), so the device never waits for the host; on the CPU it reads each step as it ends. It applies EOS / stop sequences / the token budget, and stops launching when every
sequence is finished, so a finished batch costs at most one extra step. The KV cache lives in the backend's
buffers and is never copied; the only per-step host arrays are the [B] tokens / logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .backend import Backend, StepState
from .decode_step import DecodeStep
from .sampler import SamplingConfig
from .stopping import FinishReason, GenerationError, StopCriteria

__all__ = ["GenerationError", "GenerationResult", "StepEvent", "check_request", "generate", "generate_ids",
           "generate_result"]


@dataclass(frozen=True)
class StepEvent:
    """One generated position of the batch. Arrays are [batch]; only rows with ``emitted`` carry a new token."""

    step: int  # 0 = the token chosen from the prefill logits
    tokens: np.ndarray  # int64
    logprobs: np.ndarray  # float32, log-probability under the sampler's final distribution
    emitted: np.ndarray  # bool: the sequence was active and produced tokens[b] at this step
    finished: np.ndarray  # bool: the sequence is finished after this step
    finish_reasons: tuple[FinishReason | None, ...]

    def new_tokens(self) -> dict[int, int]:
        """{sequence index: token} for the sequences that produced a token at this step."""
        return {int(b): int(self.tokens[b]) for b in np.flatnonzero(self.emitted)}


@dataclass(frozen=True)
class GenerationResult:
    prompt_ids: list[list[int]]
    output_ids: list[list[int]]  # generated ids only; ends with the EOS / stop-sequence token when that stopped it
    logprobs: list[list[float]]
    finish_reasons: list[FinishReason]
    steps: int
    text: list[str] | None = None  # decoded output_ids, filled by generate_text when a tokenizer exists

    @classmethod
    def collect(cls, prompts: Sequence[Sequence[int]], events: Iterable[StepEvent]) -> "GenerationResult":
        ids: list[list[int]] = [[] for _ in prompts]
        lps: list[list[float]] = [[] for _ in prompts]
        reasons: tuple[FinishReason | None, ...] = (None,) * len(prompts)
        steps = 0
        for ev in events:
            for b in np.flatnonzero(ev.emitted):
                ids[b].append(int(ev.tokens[b]))
                lps[b].append(float(ev.logprobs[b]))
            reasons, steps = ev.finish_reasons, ev.step + 1
        return cls([list(map(int, p)) for p in prompts], ids, lps, [r or "length" for r in reasons], steps)


def check_request(backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Raise GenerationError (a user error) for a request the artifact cannot serve."""
    backend.check_request(prompts, max_new_tokens)


def generate(backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
             sampling: SamplingConfig = SamplingConfig(), eos_ids: Iterable[int] | None = None,
             stop_sequences: Sequence[Sequence[int]] = (), state: StepState | None = None,
             pad_id: int = 0) -> Iterator[StepEvent]:
    """Stream the generation of ``prompts`` (token ids) as StepEvents; checks run now, work on iteration.

    eos_ids: None = the artifact's config eos_token_ids; () = never stop on EOS.
    state: a StepState of ``backend.allocate(len(prompts))`` to reuse (stale cache rows are masked); on the
    ort backend with CUDA graphs a state keeps its captured decode graph, so reusing one skips the capture.
    """
    backend.check_request(prompts, max_new_tokens)
    eos = backend.manifest.config.eos_token_ids if eos_ids is None else tuple(eos_ids)
    stops = StopCriteria(len(prompts), max_new_tokens, eos, stop_sequences)
    if state is not None and state.batch != len(prompts):
        raise ValueError(f"state was allocated for batch {state.batch}, got {len(prompts)} prompts")
    return _loop(backend, [list(map(int, p)) for p in prompts], sampling, stops, state, pad_id)


def generate_result(backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                    sampling: SamplingConfig = SamplingConfig(), **kwargs: Any) -> GenerationResult:
    """Run ``generate`` to the end; keyword arguments as for ``generate``."""
    return GenerationResult.collect(prompts, generate(backend, prompts, max_new_tokens, sampling, **kwargs))


def generate_ids(backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                 sampling: SamplingConfig = SamplingConfig(), **kwargs: Any) -> list[list[int]]:
    """Generated ids per prompt (without the prompt)."""
    return generate_result(backend, prompts, max_new_tokens, sampling, **kwargs).output_ids


# ------------------------------------------------------------------------------------------------ the loop


def _loop(backend: Backend, prompts: list[list[int]], sampling: SamplingConfig, stops: StopCriteria,
          state: StepState | None, pad_id: int) -> Iterator[StepEvent]:
    import torch

    lens_B = np.array([len(p) for p in prompts], dtype=np.int64)
    state = state or backend.allocate(len(prompts))
    with torch.no_grad():
        logits = backend.step(state, *_prefill_inputs(prompts, lens_B, pad_id))
        step = DecodeStep.of(backend, state, sampling)
        step.start(prompts, _last_valid(_as_torch(logits), lens_B), lens_B)
    queued, k = 1, 0  # positions whose tokens are on their way to the host; position 0 comes from the prefill
    while True:
        while queued < stops.max_new_tokens and queued <= k + step.channel.lookahead:
            step.advance()  # on CUDA launched before the host reads position k: the device runs one step ahead
            queued += 1
        tokens_B, logprobs_B = step.channel.pop()
        active_B = ~stops.finished
        stops.update(tokens_B, active_B)
        yield StepEvent(k, tokens_B, logprobs_B, active_B, stops.finished.copy(), tuple(stops.reasons))
        if stops.all_finished:
            return
        k += 1


def _prefill_inputs(prompts: list[list[int]], lens_B: np.ndarray, pad_id: int):
    B, S = len(prompts), int(lens_B.max())
    ids_BS = np.full((B, S), pad_id, dtype=np.int64)
    for b, p in enumerate(prompts):
        ids_BS[b, :len(p)] = p
    pos_BS = np.broadcast_to(np.arange(S, dtype=np.int64), (B, S)).copy()
    return ids_BS, pos_BS, np.zeros(B, dtype=np.int64), lens_B.copy()


def _last_valid(logits: Any, lens_B: np.ndarray) -> Any:
    """[B, V] logits of each sequence's last prompt token, from [B, S, V] ("all") or [B, 1, V] ("last")."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    import torch

    rows = torch.arange(len(lens_B), device=logits.device)
    return logits[rows, torch.as_tensor(lens_B - 1, device=logits.device)]


def _as_torch(logits: Any) -> Any:
    import torch

    return logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
