"""The decode loop: one right-padded prefill for the whole batch, then one-token decode steps.

    prefill: input_ids_BS (right-padded), position_ids = arange(S), write_indices = 0, nonpad = len_b
    decode:  input_ids_B1 = last token, position_ids = write_indices = len_b, nonpad = len_b + 1

``generate`` checks the request up front (raising GenerationError before any work), then returns an
iterator of ``StepEvent``s, one per generated position, so callers can stream. A finished sequence
keeps stepping (its row in the batch is rewritten at a fixed cache row, harmlessly) but emits nothing;
the loop ends when every sequence is finished. The KV cache lives in the backend's buffers and is never
copied; the only per-step host arrays are the [B] tokens / logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .backend import Backend, StepState
from .sampler import Sampler, SamplingConfig
from .sampler_graph import GraphedSampling, capturable
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
    m = backend.manifest
    if len(prompts) == 0:
        raise GenerationError("no prompts given; pass at least one prompt")
    if len(prompts) > m.max_batch:
        raise GenerationError(f"{len(prompts)} prompts exceed the artifact's max_batch {m.max_batch}; "
                              f"re-export with --max-batch {len(prompts)} or pass fewer prompts")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if m.dialect in ("ort-gqa-uniform", "ort-gqa-static") and len({len(p) for p in prompts}) > 1:
        raise GenerationError(f"this {m.dialect} artifact needs prompts of equal length in one batch; "
                              "re-optimize with --dialect ort-gqa (onnxruntime >= 1.32) or std")
    vocab = m.config.vocab_size
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {b} is empty; every prompt needs at least one token")
        if len(p) + max_new_tokens > m.max_seq:
            raise GenerationError(f"prompt of {len(p)} tokens + {max_new_tokens} new tokens exceeds the artifact's "
                                  f"max_seq {m.max_seq}; re-export with --max-seq {len(p) + max_new_tokens} "
                                  f"or lower --max-new-tokens / shorten the prompt")
        bad = [int(t) for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise GenerationError(f"prompt {b} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")


def generate(backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
             sampling: SamplingConfig = SamplingConfig(), eos_ids: Iterable[int] | None = None,
             stop_sequences: Sequence[Sequence[int]] = (), state: StepState | None = None,
             pad_id: int = 0) -> Iterator[StepEvent]:
    """Stream the generation of ``prompts`` (token ids) as StepEvents; checks run now, work on iteration.

    eos_ids: None = the artifact's config eos_token_ids; () = never stop on EOS.
    state: a StepState of ``backend.allocate(len(prompts))`` to reuse (stale cache rows are masked); on the
    ort backend with CUDA graphs a state keeps its captured decode graph, so reusing one skips the capture.
    """
    check_request(backend, prompts, max_new_tokens)
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
    B = len(prompts)
    lens_B = np.array([len(p) for p in prompts], dtype=np.int64)
    state = state or backend.allocate(B)
    logits = backend.step(state, *_prefill_inputs(prompts, lens_B, pad_id))
    sampler = _sampler(sampling, logits, B, backend.manifest.config.vocab_size)
    sampler.reset(prompts)
    last_BV = _last_valid(logits, lens_B)
    # decode inputs, written in place every step
    ids_B1 = np.empty((B, 1), dtype=np.int64)
    pos_B1 = np.empty((B, 1), dtype=np.int64)
    write_B = np.empty(B, dtype=np.int64)
    nonpad_B = np.empty(B, dtype=np.int64)
    length_B = lens_B.copy()  # rows of valid cache per sequence
    graphed, first_ptr = None, None  # CUDA: decode sampling, captured once the logits buffer proves fixed
    step = 0
    while True:
        active_B = ~stops.finished
        if step == 1 and capturable(sampler, last_BV):
            first_ptr = last_BV.data_ptr()
        elif step == 2 and first_ptr is not None and first_ptr == last_BV.data_ptr():
            # the decode logits buffer is fixed (a backend returning a new tensor per step stays eager)
            graphed = GraphedSampling(sampler, last_BV)
        if graphed is not None and graphed.reads(last_BV):
            tokens_B, logprobs_B = graphed.host(active_B)
        else:
            result = sampler.sample(last_BV)
            sampler.observe(result.tokens, active_B)
            tokens_B, logprobs_B = _host(result.tokens), _host(result.logprobs)
        stops.update(tokens_B, active_B)
        yield StepEvent(step, tokens_B, logprobs_B, active_B, stops.finished.copy(), tuple(stops.reasons))
        if stops.all_finished:
            return
        # a finished sequence rewrites row length_B[b] (past its output) each step; its length stays
        ids_B1[:, 0] = tokens_B
        np.copyto(write_B, length_B)
        pos_B1[:, 0] = write_B
        np.add(write_B, 1, out=nonpad_B)
        length_B += ~stops.finished
        logits = backend.step(state, ids_B1, pos_B1, write_B, nonpad_B)
        last_BV = logits[:, 0]
        step += 1


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
    if isinstance(logits, np.ndarray):
        return logits[np.arange(len(lens_B)), lens_B - 1]
    import torch

    rows = torch.arange(len(lens_B), device=logits.device)
    return logits[rows, torch.as_tensor(lens_B - 1, device=logits.device)]


def _sampler(config: SamplingConfig, logits: Any, batch: int, vocab: int) -> Sampler:
    if isinstance(logits, np.ndarray):
        return Sampler(config, batch, vocab, backend="numpy")
    return Sampler(config, batch, vocab, backend="torch", device=logits.device)


def _host(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()
