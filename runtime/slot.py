"""One busy row of the scheduler's static cache: a request's progress, its own sampler, stop state and text.

A slot owns cache row ``row``. Its prompt is prefilled in chunks (``prefilled`` tokens are in the cache); after
the last chunk the step's logits give token 0, and each later step feeds the previous token at position
``length`` (tokens in the cache) and samples the next. Sampling is per request (a batch-1 ``Sampler`` with the
request's config and seed), so a seeded request draws the same tokens whatever else is in the batch, and the
same as ``generate`` on that prompt alone. Tokens that could be the start of a stop sequence are held back
until they cannot; the matched stop sequence itself is never emitted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .request import Delta, FinishReason, Stream
from .sampler import Sampler
from .stopping import StopCriteria
from .tokenizer import TextStream, Tokenizer


class Slot:
    def __init__(self, row: int, stream: Stream, vocab: int, eos_ids: tuple[int, ...], device: Any,
                 tokenizer: Tokenizer | None) -> None:
        req = stream.request
        self.row, self.stream = row, stream
        self.prompt = list(req.prompt_ids)
        self.prefilled = 0  # prompt tokens in the cache
        self.output: list[int] = []
        self.sampler = Sampler(req.sampling, 1, vocab, backend="torch", device=device)
        self.sampler.reset([self.prompt])
        self.stops = StopCriteria(1, req.max_tokens, eos_ids, req.stop_ids)
        self._hold = max((len(s) for s in req.stop_ids), default=1) - 1  # tokens that may start a stop match
        self._sent = 0  # output tokens already pushed
        self._text: TextStream | None = tokenizer.stream() if tokenizer is not None else None

    # -------------------------------------------------------------------------------------------- progress

    @property
    def decoding(self) -> bool:
        """The prompt is in the cache and the last token waits to be fed."""
        return self.prefilled == len(self.prompt)

    @property
    def length(self) -> int:
        """Tokens in the cache: the prompt, then every output token but the last (not fed yet)."""
        return self.prefilled + max(len(self.output) - 1, 0)

    def chunk(self, limit: int) -> list[int]:
        """The next prompt tokens to prefill, at most ``limit``."""
        return self.prompt[self.prefilled:self.prefilled + limit]

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: the scheduler picks these rows' tokens in one batched argmax."""
        cfg = self.stream.request.sampling
        return cfg.greedy and not cfg.has_penalties

    def choose(self, logits_1V: Any) -> FinishReason | None:
        """Sample the next token from this row's logits; returns the finish reason when it ends the request."""
        result = self.sampler.sample(logits_1V)
        if self.stream.request.sampling.has_penalties:
            self.sampler.observe(result.tokens)
        return self.accept(int(result.tokens[0]))

    def accept(self, token: int) -> FinishReason | None:
        """Append a chosen token; returns the finish reason when it ends the request."""
        self.output.append(token)
        self.stops.update(np.array([token], dtype=np.int64), np.array([True]))
        return self.stops.reasons[0]

    # -------------------------------------------------------------------------------------------- output

    def emit(self, reason: FinishReason | None, error: str | None = None) -> None:
        """Push what became final to the stream: all but the held-back tail, or everything at the end."""
        if reason is None:
            upto = len(self.output) - self._hold
        elif reason == "stop":
            upto = len(self.output) - self._matched_stop()
        else:
            upto = len(self.output)
        upto = max(upto, self._sent)
        new = self.output[self._sent:upto]
        self._sent = upto
        if not new and reason is None:
            return
        text = "".join(self._text.push(t) for t in new) if self._text is not None else ""
        if reason is not None and self._text is not None:
            text += self._text.flush()
        self.stream.push(Delta(tuple(new), text, reason, error=error))

    def _matched_stop(self) -> int:
        tail = tuple(self.output)
        for seq in self.stops.stop_sequences:
            if tail[len(tail) - len(seq):] == seq:
                return len(seq)
        return 0
