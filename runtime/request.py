"""One request of the serving scheduler (runtime/scheduler.py): what is asked, what comes back, and its handle.

    Request  -- prompt ids, token budget, per-request sampling (seeded draws are reproducible whatever else
                shares the batch), stop sequences (token ids), EOS ids
    Delta    -- new token ids of the request since the consumer last read, their text, and, on the last one,
                the finish reason ("eos", "stop", "length", "cancelled", "error")
    Stream   -- the caller's handle: iterate it (blocking) or ``async for`` it (when submitted with a loop),
                ``result()`` it, or ``cancel()`` it

The engine thread does as little per token as it can: it appends the raw token id (and the step's time) to the
stream and, once per step, wakes the consumers that wait (``Notifier``: one wake-up per event loop per step,
however many requests of that loop got tokens; a ``result()`` caller is woken only when its request ends). The
consumer side turns what arrived into Deltas: tokens that arrived since its last read are merged into one delta,
tokens that could start a stop sequence are held back until they cannot, the matched stop sequence is dropped,
and the text is detokenized incrementally there, on the consumer's thread, while the engine runs the model.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Literal

from .sampler import SamplingConfig
from .tokenizer import TextStream, Tokenizer

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
    time: float = field(default_factory=time.perf_counter)  # when the engine produced the last of these tokens
    error: str | None = None  # the message, with finish_reason "error"
    first_time: float | None = None  # when the engine produced the first of these tokens (None: no tokens)

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


@dataclass(frozen=True)
class _End:
    """The engine's last word on a request: why it ended and how many trailing tokens (a stop match) to drop."""

    reason: FinishReason
    trim: int
    error: str | None
    time: float


class Stream:
    """Handle of one submitted request. Deltas arrive in order; the last one has a finish reason."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None = None,
                 on_cancel: Callable[["Stream"], None] | None = None, tokenizer: Tokenizer | None = None) -> None:
        self.id = next(_ids)
        self.request = request
        self.submitted = time.perf_counter()
        self.loop = loop
        self.each_token = False  # a consumer iterates: wake it every step, not only at the end
        self._raw: collections.deque[Any] = collections.deque()  # engine -> consumer: (token, time) ..., _End
        self._cond = threading.Condition() if loop is None else None
        self._event = asyncio.Event() if loop is not None else None
        self._ended = threading.Event()
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel  # the scheduler's, so a cancel is seen before its next step
        # consumer side
        self._text: TextStream | None = tokenizer.stream() if tokenizer is not None else None
        self._hold = max((len(s) for s in request.stop_ids), default=1) - 1  # tokens that may start a stop match
        self._pending: list[tuple[int, float]] = []  # arrived, not yet sent (held back)
        self._first: float | None = None
        self._result: Completion | None = None
        self._parts: list[Delta] = []  # what result() gathers

    # --------------------------------------------------------------------------------------- caller side

    def cancel(self) -> None:
        """Stop generating: the engine frees the request's slot (or queue place) before its next step."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self._on_cancel is not None:
                self._on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        """The engine has ended the request (its last delta may still be unread)."""
        return self._ended.is_set()

    def __iter__(self) -> Iterator[Delta]:
        if self._cond is None:
            raise RuntimeError("this stream was submitted with an event loop: use `async for`")
        self.each_token = True
        while True:
            with self._cond:
                while not self._raw:
                    self._cond.wait()
            delta = self._drain()
            if delta is not None:
                yield delta
                if delta.finished:
                    return

    async def __aiter__(self) -> AsyncIterator[Delta]:
        if self._event is None:
            raise RuntimeError("this stream was submitted without an event loop: iterate it with `for`")
        self.each_token = True
        while True:
            if not self._raw:
                self._event.clear()
                if not self._raw:
                    await self._event.wait()
            delta = self._drain()
            if delta is not None:
                yield delta
                if delta.finished:
                    return

    def result(self) -> Completion:
        """Block until the request finishes; its tokens, text and finish reason (only the deltas not yet read
        by iterating; a second call returns the same Completion). Streams submitted with a loop: after the end."""
        if self._result is None:
            self._ended.wait()
            delta = self._drain()
            self._result = collect(self.submitted, iter([delta] if delta is not None else []))
        return self._result

    async def finished(self) -> Delta:
        """Wait (in the stream's loop) for the end without a wake-up per token; everything not read yet, as one
        Delta. Streams submitted with a loop."""
        if self._event is None:
            raise RuntimeError("this stream was submitted without an event loop: use result()")
        while not self._ended.is_set():
            self._event.clear()
            if not self._ended.is_set():
                await self._event.wait()
        delta = self._drain()
        assert delta is not None and delta.finished
        return delta

    # --------------------------------------------------------------------------------------- engine side

    def feed(self, token: int, t: float) -> None:
        """A generated token (engine thread only; the Notifier wakes the consumer after the step)."""
        self._raw.append((token, t))

    def end(self, reason: FinishReason, trim: int = 0, error: str | None = None) -> None:
        """The request is over (engine thread only); ``trim``: trailing tokens of a stop match to drop."""
        if not self._ended.is_set():
            self._raw.append(_End(reason, trim, error, time.perf_counter()))
            self._ended.set()

    def wake(self) -> None:
        """Wake a blocking consumer (engine thread; async streams are woken through their loop: Notifier)."""
        if self._cond is not None:
            with self._cond:
                self._cond.notify()

    # --------------------------------------------------------------------------------------- consumer side

    def _drain(self) -> Delta | None:
        """Everything that arrived since the last read, as one Delta (None when nothing can be sent yet)."""
        end: _End | None = None
        while self._raw:
            item = self._raw.popleft()
            if isinstance(item, _End):
                end = item
                break
            self._pending.append(item)
        if end is None:
            upto = len(self._pending) - self._hold
        else:
            upto = len(self._pending) - (end.trim if end.reason == "stop" else 0)
        if upto <= 0 and end is None:
            return None
        sent, self._pending = self._pending[:max(upto, 0)], self._pending[max(upto, 0):]
        if end is not None:
            self._pending = []
        ids = tuple(t for t, _ in sent)
        text = "".join(self._text.push(t) for t in ids) if self._text is not None else ""
        if end is not None and self._text is not None:
            text += self._text.flush()
        first = sent[0][1] if sent else None
        last = sent[-1][1] if sent else (end.time if end is not None else time.perf_counter())
        return Delta(ids, text, end.reason if end is not None else None, last,
                     end.error if end is not None else None, first)


class Notifier:
    """Wakes the consumers of the streams that got something this step: blocking ones directly, and each event
    loop once, with the list of its streams (one ``call_soon_threadsafe`` per loop per step)."""

    def __init__(self) -> None:
        self._streams: list[Stream] = []

    def mark(self, stream: Stream) -> None:
        self._streams.append(stream)

    def flush(self) -> None:
        if not self._streams:
            return
        streams, self._streams = self._streams, []
        loops: dict[Any, list[Stream]] = {}
        for s in streams:
            if s.loop is None:
                s.wake()
            else:
                loops.setdefault(s.loop, []).append(s)
        for loop, group in loops.items():
            try:
                loop.call_soon_threadsafe(_set_events, group)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for s in group:
                    s.cancel()


def _set_events(streams: list[Stream]) -> None:
    for s in streams:
        s._event.set()  # type: ignore[union-attr]


def collect(submitted: float, deltas: Iterator[Delta]) -> Completion:
    ids: list[int] = []
    text: list[str] = []
    first = None
    for d in deltas:
        if d.token_ids and first is None:
            first = (d.first_time or d.time) - submitted
        ids.extend(d.token_ids)
        text.append(d.text)
        if d.finished:
            return Completion(ids, "".join(text), d.finish_reason, first, d.error)
    raise RuntimeError("the stream ended without a finish reason")
