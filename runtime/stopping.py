"""When a sequence of the decode loop is done: EOS ids, token-level stop sequences, the token budget.

Checked in that order after each token; the token that triggers a stop is part of the output
(the EOS id, or the last token of the stop sequence), as transformers' generate() keeps it.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Literal, Sequence

import numpy as np

from ..errors import GenerationError  # noqa: F401 - re-exported

FinishReason = Literal["eos", "stop", "length"]


class StopCriteria:
    """Per-sequence stop state of one batch; ``update`` consumes one step's tokens."""

    def __init__(self, batch: int, max_new_tokens: int, eos_ids: Iterable[int] = (),
                 stop_sequences: Sequence[Sequence[int]] = ()) -> None:
        self.max_new_tokens = max_new_tokens
        self.eos_ids = np.asarray(sorted({int(i) for i in eos_ids}), dtype=np.int64)
        self.stop_sequences = [tuple(int(t) for t in s) for s in stop_sequences]
        if any(len(s) == 0 for s in self.stop_sequences):
            raise GenerationError("a stop sequence is empty; pass at least one token per stop sequence")
        tail = max((len(s) for s in self.stop_sequences), default=0)
        self._tails = [deque(maxlen=tail) for _ in range(batch)]
        self.finished = np.zeros(batch, dtype=bool)
        self._none = np.zeros(batch, dtype=bool)
        self.generated = np.zeros(batch, dtype=np.int64)
        self.reasons: list[FinishReason | None] = [None] * batch

    def update(self, tokens: np.ndarray, active: np.ndarray) -> None:
        """Account tokens[b] for every active sequence b and mark the ones that finish with it."""
        self.generated += active
        if self.stop_sequences:  # per row: the tails need every token in order
            is_eos = (tokens[:, None] == self.eos_ids).any(axis=1)
            for b in np.flatnonzero(active):
                reason = self._reason(int(b), int(tokens[b]), bool(is_eos[b]))
                if reason is not None:
                    self.finished[b] = True
                    self.reasons[b] = reason
            return
        eos = active & (tokens[:, None] == self.eos_ids).any(axis=1) if self.eos_ids.size else self._none
        # vectorized: EOS first, then the budget
        length = active & ~eos & (self.generated >= self.max_new_tokens)
        if eos.any() or length.any():
            for b in np.flatnonzero(eos | length):
                self.reasons[b] = "eos" if eos[b] else "length"
            self.finished |= eos | length

    def _reason(self, b: int, token: int, is_eos: bool) -> FinishReason | None:
        if is_eos:
            return "eos"
        if self.stop_sequences:
            tail = self._tails[b]
            tail.append(token)
            for seq in self.stop_sequences:
                if len(tail) >= len(seq) and tuple(tail)[len(tail) - len(seq):] == seq:
                    return "stop"
        if self.generated[b] >= self.max_new_tokens:
            return "length"
        return None

    @property
    def all_finished(self) -> bool:
        return bool(self.finished.all())
