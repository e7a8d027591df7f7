"""How new requests' prompts get into the scheduler's shared cache: prefilled in small side states, copied in.

The shared decode step stays [B, 1] whatever arrives: prompts are prefilled beside it, in side states of their
own (``Backend.allocate`` of 1, 2, 4, ... rows, made once, before any decode step is captured), and each
sequence's K/V positions are copied into its row of the shared cache (``RowCopier``, on the decode step's
stream). Requests that arrive together are prefilled together:

- a group is up to ``group`` waiting prompts, in arrival order: any lengths, right-padded, where the artifact
  allows ``mixed_lengths``; else the prompts of the first one's length (``ort-gqa-static``: equal-length
  prefills into an empty cache);
- a group of k runs as the power-of-two pieces of k (7 = 4 + 2 + 1), so no padding row is ever computed;
- a prompt longer than ``chunk`` tokens, where the artifact allows ``cache_append``, is prefilled alone in a
  lane of its own, ``chunk`` tokens per engine step, so the decoding rows wait for one chunk at a time; other
  artifacts prefill it whole.

Each sequence's first token comes from its prefill's last logits: one argmax for the plain-greedy ones, the
request's own sampler for the others.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import numpy as np

from .backend import Backend, StepState
from .cache_rows import RowCopier
from .generate import _as_torch, _last_valid, _prefill_inputs
from .slot import Slot


class SidePrefill:
    def __init__(self, backend: Backend, shared: StepState, group: int, chunk: int,
                 on_stream: Callable[[], Any]) -> None:
        self.backend, self.group, self.chunk, self.on_stream = backend, group, chunk, on_stream
        self.mixed = backend.manifest.allows("mixed_lengths")
        dst = backend.caches(shared)
        self.sizes = [1 << i for i in range(group.bit_length())]  # 1, 2, 4, ... <= group
        self.states = {k: self._side(k, dst) for k in self.sizes}
        self.lane = self._side(1, dst) if backend.manifest.allows("cache_append") else None
        self.runs = 0  # prefill runs so far (a group of k prompts is one run per power-of-two piece)

    def _side(self, batch: int, dst: list[Any]) -> tuple[StepState, RowCopier]:
        state = self.backend.allocate(batch)
        return state, RowCopier(dst, self.backend.caches(state))

    def is_long(self, slot: Slot) -> bool:
        """Prefilled in chunks, in the lane."""
        return self.lane is not None and len(slot.prompt) > self.chunk

    def take(self, waiting: deque[Slot]) -> list[Slot]:
        """The next group of waiting slots (removed from ``waiting``; see the module docstring)."""
        if self.mixed:
            return [waiting.popleft() for _ in range(min(self.group, len(waiting)))]
        n = len(waiting[0].prompt)
        group = [s for s in waiting if len(s.prompt) == n][:self.group]
        for s in group:
            waiting.remove(s)
        return group

    def prefill(self, group: list[Slot]) -> list[int]:
        """Prefill the group's prompts, copy their K/V into their rows, and choose each one's first token."""
        tokens: list[int] = []
        start = 0
        for k in reversed(self.sizes):
            while len(group) - start >= k:
                tokens += self._run(group[start:start + k], *self.states[k])
                start += k
        return tokens

    def advance_lane(self, slot: Slot) -> int | None:
        """One chunk of a long prompt in the lane; its first token once the whole prompt is in its row."""
        state, copier = self.lane
        n = min(self.chunk, len(slot.prompt) - slot.prefilled)
        p = slot.prefilled
        ids = np.asarray([slot.prompt[p:p + n]], dtype=np.int64)
        pos = np.arange(p, p + n, dtype=np.int64)[None]
        logits = self.backend.step(state, ids, pos, np.array([p], dtype=np.int64), np.array([p + n], dtype=np.int64))
        self.runs += 1
        slot.prefilled = p + n
        if slot.prefilled < len(slot.prompt):
            return None
        with self.on_stream():
            copier.copy(slot.row, slot.prefilled)
            return self._first_tokens([slot], _last_valid(_as_torch(logits), np.array([n], dtype=np.int64)))[0]

    def _run(self, group: list[Slot], state: StepState, copier: RowCopier) -> list[int]:
        prompts = [list(s.prompt) for s in group]
        lens_B = np.array([len(p) for p in prompts], dtype=np.int64)
        logits = self.backend.step(state, *_prefill_inputs(prompts, lens_B, 0))
        self.runs += 1
        with self.on_stream():  # CUDA: ordered with the decode steps (the rows' last use, their next one)
            for b, slot in enumerate(group):
                copier.copy(slot.row, len(slot.prompt), b)
                slot.prefilled = len(slot.prompt)
            return self._first_tokens(group, _last_valid(_as_torch(logits), lens_B))

    @staticmethod
    def _first_tokens(group: list[Slot], last_BV: Any) -> list[int]:
        plain = [b for b, s in enumerate(group) if s.plain]
        tokens = [0] * len(group)
        if plain:
            rows = last_BV if len(plain) == len(group) else last_BV[plain]
            for b, t in zip(plain, rows.argmax(dim=-1).tolist()):
                tokens[b] = t
        for b, s in enumerate(group):
            if not s.plain:
                tokens[b] = int(s.choose(last_BV[b:b + 1])[0])
        return tokens
