"""Continuous batching over a static KV cache: the cache's batch rows are slots, one request per slot.

One engine thread owns the backend and runs steps while any request is in a slot. Each shared step is one
[B, S] ``Backend.step`` over every row; the std dialect builds the attention mask per row from position_ids and
nonpad_kv_seqlen, so rows at different lengths, and rows doing different things, share it:

    prefilling row  ids = next prompt chunk (c <= prefill_chunk tokens) + pad, positions p.., write p, nonpad p + c
    decoding row    ids = [last token, pad...],  positions len.., write len, nonpad len + 1
    free row        ids = pad,                   positions 0..,   write 0,   nonpad 1 (its outputs are dropped)

Padding columns write K/V past a row's valid length, which nonpad masks and later steps overwrite; S is capped
so that every row's write + S stays within max_seq. How a new request's prompt gets into its row
(``SchedulerConfig.prefill``):

- "side" (default): the whole prompt runs alone in a batch-1 state, its K/V rows are copied into the slot's row
  of the shared cache (``Backend.caches``), and the shared steps stay [B, 1]. Measured on the CPU (preset:tiny,
  benchmarks/serve_load.py) this is the fast mode: a [B, S] step makes every row compute S columns.
- "mixed": the prompt is prefilled in chunks inside the shared [B, S] steps, beside the decoding rows.

Either way the request takes its first token from its prefill's logits, joins the shared decode steps from
the next step on, and leaves its slot at EOS, a stop sequence, its token budget or cancellation. Requests beyond
the slots wait in a bounded FIFO queue; beyond ``max_queue`` ``submit`` raises QueueFullError.

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
from .cache_rows import RowCopier
from .request import Delta, Request, Stream
from .slot import Slot
from .tokenizer import Tokenizer, generation_eos_ids


@dataclass(frozen=True)
class SchedulerConfig:
    max_queue: int = 64  # requests waiting for a slot; more are refused
    prefill_chunk: int = 256  # most prompt tokens of one request per step (bounds the other rows' step latency)
    slots: int | None = None  # cache rows to serve from; None = the artifact's max_batch
    pad_id: int = 0
    # "side": prefill each new prompt alone in a batch-1 state and copy its K/V into its row (decode steps stay
    # [B, 1]); "mixed": prefill it in the shared [B, S] step beside the decoding rows (every row computes S columns)
    prefill: str = "side"
    prefills_per_step: int = 4  # "side": new prompts prefilled before each shared decode step

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise GenerationError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.slots is not None and self.slots < 1:
            raise GenerationError(f"slots must be >= 1, got {self.slots}")
        if self.prefill not in ("side", "mixed"):
            raise GenerationError(f"prefill must be 'side' or 'mixed', got {self.prefill!r}")
        if self.prefills_per_step < 1:
            raise GenerationError(f"prefills_per_step must be >= 1, got {self.prefills_per_step}")


@dataclass(frozen=True)
class StepPlan:
    """Host arrays of one mixed step, and which rows sample a token from it (``sample_col`` = logits column)."""

    ids_BS: np.ndarray
    pos_BS: np.ndarray
    write_B: np.ndarray
    nonpad_B: np.ndarray
    chunks: dict[int, int]  # row -> prompt tokens prefilled by this step
    sample_col: dict[int, int]  # row -> column of its last real token, for rows that choose a token


def plan_step(slots: list[Slot | None], max_seq: int, prefill_chunk: int, pad_id: int = 0,
              decode_only: bool = False) -> StepPlan:
    """The next step over every row (see the module docstring); needs at least one busy slot. ``decode_only``:
    rows still to prefill step as free rows."""
    busy = [s for s in slots if s is not None and (s.decoding or not decode_only)]
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
        needs = ["mixed_lengths"] + (["cache_append"] if config.prefill == "mixed" else [])
        if not all(backend.manifest.allows(c) for c in needs):
            raise GenerationError(f"continuous batching ({config.prefill} prefill) needs an artifact that allows "
                                  f"{' and '.join(needs)}; this {backend.manifest.dialect} artifact does not "
                                  f"(re-optimize with --dialect std)")
        self.backend, self.config, self.tokenizer = backend, config, tokenizer
        self.eos_ids = generation_eos_ids(backend.artifact, backend.manifest)
        n = config.slots or backend.max_batch
        self.state = backend.allocate(n)
        self.side = backend.allocate(1) if config.prefill == "side" else None
        self._rows = (RowCopier(backend.caches(self.state), backend.caches(self.side))
                      if self.side is not None else None)
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
        made = 0
        if self.side is not None:
            for slot in [s for s in self.slots if s is not None and not s.decoding][:self.config.prefills_per_step]:
                made += self._side_prefill(slot)
        if any(s is not None and (s.decoding or self.side is None) for s in self.slots):
            made += self._shared_step()
        self.tokens_generated += made
        self._rate.append((time.perf_counter(), made))
        while len(self._rate) > 4096:
            self._rate.popleft()

    def _shared_step(self) -> int:
        plan = plan_step(self.slots, self.backend.max_seq, self.config.prefill_chunk, self.config.pad_id,
                         decode_only=self.side is not None)
        logits = _as_torch(self.backend.step(self.state, plan.ids_BS, plan.pos_BS, plan.write_B, plan.nonpad_B))
        self.steps += 1
        for row, n in plan.chunks.items():
            self.slots[row].prefilled += n
        cols = {row: (col if logits.shape[1] > 1 else 0) for row, col in plan.sample_col.items()}
        greedy = [row for row in cols if self.slots[row].plain_greedy]
        if greedy:  # one argmax for every plain-greedy row (the Sampler's greedy path: first index on ties)
            import torch

            from .sampler_torch import argmax_last

            rows = torch.as_tensor(greedy, device=logits.device)
            picked = logits[rows, torch.as_tensor([cols[r] for r in greedy], device=logits.device)]
            for row, token in zip(greedy, argmax_last(picked).tolist()):
                self._finish_if(self.slots[row], self.slots[row].accept(token))
        for row, col in cols.items():
            if row not in greedy:
                self._choose(self.slots[row], logits[row:row + 1, col])
        return len(cols)

    def _side_prefill(self, slot: Slot) -> int:
        """The whole prompt in the batch-1 side state, its K/V rows copied into the slot's row, token 0 chosen."""
        n = len(slot.prompt)
        ids = np.asarray([slot.prompt], dtype=np.int64)
        logits = _as_torch(self.backend.step(self.side, ids, np.arange(n, dtype=np.int64)[None],
                                             np.zeros(1, dtype=np.int64), np.array([n], dtype=np.int64)))
        self._rows.copy(slot.row, n)
        slot.prefilled = n
        self._choose(slot, logits[:, -1])
        return 1

    def _choose(self, slot: Slot, logits_1V: Any) -> None:
        self._finish_if(slot, slot.choose(logits_1V))

    def _finish_if(self, slot: Slot, reason: str | None) -> None:
        slot.emit(reason)  # type: ignore[arg-type]
        if reason is not None:
            self.slots[slot.row] = None

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
