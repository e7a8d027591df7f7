"""Continuous batching over a static KV cache: the cache's batch rows are slots, one request per slot.

One engine thread owns the backend and runs steps while any request is in a slot. Each step is one [B, S]
``Backend.step`` that mixes rows (the std dialect builds the attention mask per row from position_ids and
nonpad_kv_seqlen):

    prefilling row  ids = next prompt chunk (c <= prefill_chunk tokens) + pad, positions p.., write p, nonpad p + c
    decoding row    ids = [last token, pad...],  positions len.., write len, nonpad len + 1
    free row        ids = pad,                   positions 0..,   write 0,   nonpad 1 (its outputs are dropped)

Padding columns write K/V past a row's valid length, which nonpad masks and later steps overwrite; S is capped
so that every row's write + S stays within max_seq. A new request is admitted into a free slot and prefilled in
the same step in which the other rows decode; it joins their decode steps from the next step on, and leaves its
slot at EOS, a stop sequence, its token budget or cancellation. Requests beyond the slots wait in a bounded FIFO
queue; beyond ``max_queue`` ``submit`` raises QueueFullError.

Library use::

    with Scheduler(backend) as sched:
        stream = sched.submit(Request(prompt_ids=(1, 2, 3), max_tokens=8))
        for delta in stream: ...          # or stream.result(); async: submit(..., loop=loop), `async for`
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import GenerationError, QueueFullError
from .backend import Backend, check_prompts
from .request import Delta, Request, Stream
from .slot import Slot
from .tokenizer import Tokenizer, generation_eos_ids


@dataclass(frozen=True)
class SchedulerConfig:
    max_queue: int = 64  # requests waiting for a slot; more are refused
    prefill_chunk: int = 256  # most prompt tokens of one request per step (bounds the other rows' step latency)
    slots: int | None = None  # cache rows to serve from; None = the artifact's max_batch
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise GenerationError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.slots is not None and self.slots < 1:
            raise GenerationError(f"slots must be >= 1, got {self.slots}")


@dataclass(frozen=True)
class StepPlan:
    """Host arrays of one mixed step, and which rows sample a token from it (``sample_col`` = logits column)."""

    ids_BS: np.ndarray
    pos_BS: np.ndarray
    write_B: np.ndarray
    nonpad_B: np.ndarray
    chunks: dict[int, int]  # row -> prompt tokens prefilled by this step
    sample_col: dict[int, int]  # row -> column of its last real token, for rows that choose a token


def plan_step(slots: list[Slot | None], max_seq: int, prefill_chunk: int, pad_id: int = 0) -> StepPlan:
    """The next step over every row (see the module docstring); needs at least one busy slot."""
    busy = [s for s in slots if s is not None]
    room = min(max_seq - (s.prefilled if not s.decoding else s.length) for s in busy)  # S so every write fits
    chunks = {s.row: len(s.chunk(min(prefill_chunk, room))) for s in busy if not s.decoding}
    S = max([1, *chunks.values()])
    B = len(slots)
    ids = np.full((B, S), pad_id, dtype=np.int64)
    pos = np.broadcast_to(np.arange(S, dtype=np.int64), (B, S)).copy()
    write = np.zeros(B, dtype=np.int64)
    nonpad = np.ones(B, dtype=np.int64)
    sample_col: dict[int, int] = {}
    for s in busy:
        if s.decoding:
            base, tokens = s.length, [s.output[-1]]
        else:
            base, tokens = s.prefilled, s.chunk(chunks[s.row])
        ids[s.row, :len(tokens)] = tokens
        pos[s.row] += base
        write[s.row], nonpad[s.row] = base, base + len(tokens)
        if s.decoding or s.prefilled + len(tokens) == len(s.prompt):
            sample_col[s.row] = len(tokens) - 1
    return StepPlan(ids, pos, write, nonpad, chunks, sample_col)


class Scheduler:
    """Continuous batching on one backend (see the module docstring). Thread-safe ``submit``; one engine thread."""

    def __init__(self, backend: Backend, config: SchedulerConfig = SchedulerConfig(),
                 tokenizer: Tokenizer | None = None) -> None:
        if not (backend.manifest.allows("mixed_lengths") and backend.manifest.allows("cache_append")):
            raise GenerationError(f"continuous batching needs an artifact whose attention masks each row by its own "
                                  f"positions and lengths; this {backend.manifest.dialect} artifact does not "
                                  f"(re-optimize with --dialect std)")
        self.backend, self.config, self.tokenizer = backend, config, tokenizer
        self.eos_ids = generation_eos_ids(backend.artifact, backend.manifest)
        n = config.slots or backend.max_batch
        self.state = backend.allocate(n)
        self.slots: list[Slot | None] = [None] * n
        self._queue: collections.deque[Stream] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._rate: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) of recent steps
        self.steps = 0
        self.tokens_generated = 0
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="decodekit-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------- public

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue a request; GenerationError for one the artifact cannot serve, QueueFullError when full."""
        check_prompts(self.backend.manifest, [request.prompt_ids], request.max_tokens, GenerationError)
        stream = Stream(request, loop, wake=self._wake)
        with self._cond:
            if self._closing:
                raise GenerationError("the scheduler is shut down")
            free = sum(s is None for s in self.slots)
            if len(self._queue) >= self.config.max_queue + free:
                raise QueueFullError(f"{len(self._queue)} requests are waiting for a slot (--max-queue "
                                     f"{self.config.max_queue}); retry later")
            self._queue.append(stream)
            self._cond.notify()
        return stream

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def tokens_per_second(self, window_s: float = 10.0) -> float:
        """Generated tokens per second over the last ``window_s`` seconds."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._rate) if now - t <= window_s]
        return sum(n for _, n in recent) / window_s if recent else 0.0

    def close(self) -> None:
        """Cancel everything, stop the engine thread and release the backend's state."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=60)

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- engine

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _run(self) -> None:
        import torch

        while True:
            with self._cond:
                while not self._closing and not self._queue and self.active == 0:
                    self._cond.wait()
                if self._closing:
                    break
                self._admit()
            if self.active:
                try:
                    with torch.no_grad():
                        self._step()
                except Exception as e:  # a bug or a device failure: fail the requests of this step, keep serving
                    self.failure = e
                    self._finish_all("error", f"{type(e).__name__}: {e}")
        self._finish_all("cancelled", None)
        with self._cond:
            while self._queue:
                self._queue.popleft().push(Delta((), "", "cancelled"))

    def _admit(self) -> None:
        """Free cancelled slots, then move queued requests into free slots (called with the lock held)."""
        for s in self.slots:
            if s is not None and s.stream.cancelled:
                self._free(s, "cancelled")
        while self._queue and None in self.slots:
            stream = self._queue.popleft()
            if stream.cancelled:
                stream.push(Delta((), "", "cancelled"))
                continue
            row = self.slots.index(None)
            eos = self.eos_ids if stream.request.eos_ids is None else stream.request.eos_ids
            self.slots[row] = Slot(row, stream, self.backend.manifest.config.vocab_size, eos,
                                   self.backend.device, self.tokenizer)

    def _step(self) -> None:
        plan = plan_step(self.slots, self.backend.max_seq, self.config.prefill_chunk, self.config.pad_id)
        logits = self.backend.step(self.state, plan.ids_BS, plan.pos_BS, plan.write_B, plan.nonpad_B)
        logits = _as_torch(logits)
        self.steps += 1
        made = 0
        for row, n in plan.chunks.items():
            self.slots[row].prefilled += n
        for row, col in plan.sample_col.items():
            slot = self.slots[row]
            reason = slot.choose(logits[row:row + 1, col if logits.shape[1] > 1 else 0])
            made += 1
            slot.emit(reason)
            if reason is not None:
                self.slots[row] = None
        self.tokens_generated += made
        self._rate.append((time.perf_counter(), made))
        while len(self._rate) > 4096:
            self._rate.popleft()

    def _free(self, slot: Slot, reason: str, error: str | None = None) -> None:
        slot.emit(reason, error)  # type: ignore[arg-type]
        self.slots[slot.row] = None

    def _finish_all(self, reason: str, error: str | None) -> None:
        for s in self.slots:
            if s is not None:
                self._free(s, reason, error)


def _as_torch(logits: Any) -> Any:
    import torch

    return logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
