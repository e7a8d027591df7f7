"""One request of the serving scheduler (runtime/scheduler.py): what is asked, what comes back, and its handle.

    Request  -- prompt ids, token budget, per-request sampling (seeded draws are reproducible whatever else
                shares the batch), stop sequences (token ids), EOS ids
    Delta    -- what one engine step produced for the request: new token ids, their text, and, on the last one,
                the finish reason ("eos", "stop", "length", "cancelled", "error")
    Stream   -- the caller's handle: iterate it (blocking) or ``async for`` it (when submitted with a loop), or
                ``cancel()`` it; the engine thread pushes deltas through a thread-safe queue
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Literal

from .sampler import SamplingConfig

FinishReason = Literal["eos", "stop", "length", "cancelled", "error"]

_ids = itertools.count(1)


@dataclass(frozen=True)
class Request:
    """prompt_ids: token ids (checked against the artifact at submit); max_tokens: most tokens to generate;
    eos_ids: None = the artifact's EOS ids, () = never stop on EOS; stop_ids: token sequences that end the
    output (the matched tokens are not part of the text)."""

    prompt_ids: tuple[int, ...]
    max_tokens: int = 16
    sampling: SamplingConfig = SamplingConfig(logprobs=False)
    stop_ids: tuple[tuple[int, ...], ...] = ()
    eos_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Delta:
    """New tokens of one request (possibly none: a final delta can carry only the finish reason)."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    time: float = field(default_factory=time.perf_counter)  # when the engine produced it
    error: str | None = None  # the message, with finish_reason "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Completion:
    """A finished request, collected from its deltas."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    first_token_s: float | None  # time to the first token, from submission
    error: str | None = None


class Stream:
    """Handle of one submitted request. Deltas arrive in order; the last one has a finish reason."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None = None,
                 wake: Any = None) -> None:
        self.id = next(_ids)
        self.request = request
        self.submitted = time.perf_counter()
        self._loop = loop
        self._sync: queue.Queue[Delta] = queue.Queue()
        self._async: asyncio.Queue[Delta] | None = asyncio.Queue() if loop is not None else None
        self._cancelled = threading.Event()
        self._wake = wake  # the scheduler's wake-up, so a cancel is seen at once
        self._result: Completion | None = None
        self.done = False

    # --------------------------------------------------------------------------------------- caller side

    def cancel(self) -> None:
        """Stop generating: the engine frees the request's slot (or queue place) before its next step."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self._wake is not None:
                self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[Delta]:
        if self._async is not None:
            raise RuntimeError("this stream was submitted with an event loop: use `async for`")
        while True:
            delta = self._sync.get()
            yield delta
            if delta.finished:
                return

    async def __aiter__(self) -> AsyncIterator[Delta]:
        if self._async is None:
            raise RuntimeError("this stream was submitted without an event loop: iterate it with `for`")
        while True:
            delta = await self._async.get()
            yield delta
            if delta.finished:
                return

    def result(self) -> Completion:
        """Block until the request finishes; its tokens, text and finish reason (only the deltas not yet read
        by iterating; a second call returns the same Completion)."""
        if self._result is None:
            self._result = collect(self.submitted, iter(self))
        return self._result

    # --------------------------------------------------------------------------------------- engine side

    def push(self, delta: Delta) -> None:
        """Called by the engine thread only."""
        if self.done:
            return
        self.done = delta.finished
        if self._async is None:
            self._sync.put(delta)
            return
        try:
            self._loop.call_soon_threadsafe(self._async.put_nowait, delta)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()


def collect(submitted: float, deltas: Iterator[Delta]) -> Completion:
    ids: list[int] = []
    text: list[str] = []
    first = None
    for d in deltas:
        if d.token_ids and first is None:
            first = d.time - submitted
        ids.extend(d.token_ids)
        text.append(d.text)
        if d.finished:
            return Completion(ids, "".join(text), d.finish_reason, first, d.error)
    raise RuntimeError("the stream ended without a finish reason")
