"""One busy row of the scheduler's static cache: a request's host state (its stream, prompt, prefill progress,
token count, EOS ids) and what only some requests need (a sampler of their own, stop-sequence tails).

A slot is "plain" when its tokens are the argmax of the raw logits (greedy, no penalties): the decode step's own
sampler picks them for every row at once. Other slots sample from their row of the step's logits with a batch-1
``Sampler`` of their own (their config and seed), so a seeded request draws the same tokens whatever else is in
the batch, and the same as ``generate`` on that prompt alone.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .request import FinishReason, Stream
from .sampler import Sampler


class Slot:
    def __init__(self, row: int, stream: Stream, eos_ids: tuple[int, ...], vocab: int, device: Any) -> None:
        req = stream.request
        self.row, self.stream = row, stream
        self.prompt = req.prompt_ids
        self.prefilled = 0  # prompt tokens in the cache (a prompt prefilled in chunks)
        self.admitted_step = 0  # the scheduler's step count when the request took this row
        self.plain = req.sampling.greedy and not req.sampling.has_penalties
        self.sampler: Sampler | None = None
        if not self.plain:
            self.sampler = Sampler(req.sampling, 1, vocab, backend="torch", device=device)
            self.sampler.reset([list(self.prompt)])
        self.stop_ids = req.stop_ids
        self.eos = frozenset(eos_ids)
        self.budget = req.max_tokens
        self.generated = 0  # tokens sent to the stream
        self._tail: deque[int] = deque(maxlen=max((len(s) for s in req.stop_ids), default=1))

    def choose(self, logits_1V: Any) -> Any:
        """This request's next token from its [1, V] logits, on their device (a [1] tensor)."""
        result = self.sampler.sample(logits_1V)
        if self.stream.request.sampling.has_penalties:
            self.sampler.observe(result.tokens)
        return result.tokens

    def accept(self, token: int) -> tuple[FinishReason | None, int]:
        """Count a sent token: the finish reason it causes (in ``StopCriteria``'s order: EOS, a stop sequence,
        the budget) and the length of the matched stop sequence (0 when none)."""
        self.generated += 1
        if token in self.eos:
            return "eos", 0
        if self.stop_ids:
            n = self._stopped(token)
            if n:
                return "stop", n
        return ("length", 0) if self.generated >= self.budget else (None, 0)

    def _stopped(self, token: int) -> int:
        """Account a token against the stop sequences: the matched sequence's length, 0 when none matched."""
        self._tail.append(token)
        tail = tuple(self._tail)
        for seq in self.stop_ids:
            if tail[len(tail) - len(seq):] == seq:
                return len(seq)
        return 0
