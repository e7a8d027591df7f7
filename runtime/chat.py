"""A multi-turn chat whose history stays in the KV cache: each turn appends its tokens, nothing is re-prefilled.

A turn renders the whole conversation with the chat template and tokenizes it; the ids whose K/V are
already cached (``cached``) are normally a prefix of it, so only the rest is run, as one multi-token step
at write_indices = the cached length (positions continue from there; nonpad_kv_seqlen = the new length).
Where the re-rendered text tokenizes differently from what was cached (the answer's end-of-turn token was
sampled but never fed, or BPE re-splits a generated word), the step starts at the first differing id and
overwrites the cache from there. Then one-token decode steps until an end-of-turn id or the budget.

    session = ChatSession(backend, tokenizer, template, end_ids)
    turn = session.send("Hi!", on_text=print)   # streams pieces; turn.text, turn.ids, turn.finish_reason
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .backend import Backend
from .chat_template import ChatTemplate, Message
from .sampler import Sampler, SamplingConfig
from .stopping import GenerationError
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class ChatTurn:
    text: str
    ids: list[int]  # generated ids, without the end-of-turn id
    finish_reason: str  # stop | length
    appended: int  # prompt ids run this turn (the rest were already in the cache)
    cached: int  # cache rows in use after the turn


# dialects whose multi-token steps must start at an empty cache (ort-gqa-static / -uniform): no appending
PREFILL_ONLY_DIALECTS = ("ort-gqa-uniform", "ort-gqa-static")


class ChatSession:
    """One conversation on one backend (batch 1); the backend's KV cache holds its history."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, template: ChatTemplate, end_ids: Sequence[int],
                 sampling: SamplingConfig = SamplingConfig(), max_new_tokens: int = 256,
                 system: str | None = None) -> None:
        if backend.manifest.dialect in PREFILL_ONLY_DIALECTS:
            raise GenerationError(f"a chat appends each turn to the KV cache with a multi-token step, which the "
                                  f"{backend.manifest.dialect} dialect cannot run; chat with a std or ort-gqa artifact")
        self.backend, self.tokenizer, self.template = backend, tokenizer, template
        self.end_ids = frozenset(int(i) for i in end_ids)
        self.max_new_tokens = max_new_tokens
        self.messages: list[Message] = [] if system is None else [{"role": "system", "content": system}]
        self.cached: list[int] = []  # ids whose K/V rows 0..len-1 hold
        self._state = backend.allocate(1)
        self._sampler = Sampler(sampling, 1, backend.manifest.config.vocab_size, backend="numpy")

    @property
    def max_seq(self) -> int:
        return self.backend.max_seq

    def prompt_ids(self, message: str) -> list[int]:
        """The ids of the whole conversation plus ``message`` and the assistant's generation prompt."""
        text = self.template.render([*self.messages, {"role": "user", "content": message}])
        return self.tokenizer.encode(text, add_special_tokens=False)

    def send(self, message: str, on_text: Callable[[str], None] | None = None) -> ChatTurn:
        """Add a user message, generate the answer (streamed through on_text), keep both in the history."""
        ids = self.prompt_ids(message)
        if len(ids) >= self.max_seq:
            raise GenerationError(f"the conversation is {len(ids)} tokens, the artifact's KV cache holds "
                                  f"max_seq {self.max_seq}; start a new chat or re-export with a larger --max-seq")
        start = min(_common_prefix(self.cached, ids), len(ids) - 1)  # run at least one id to get logits
        logits = self._run(ids[start:], start)
        self.cached = list(ids)
        self._sampler.reset([ids])
        out, reason = self._decode(logits, on_text)
        text = self.tokenizer.decode(out)
        self.messages += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
        return ChatTurn(text, out, reason, len(ids) - start, len(self.cached))

    def _run(self, new: list[int], start: int) -> np.ndarray:
        """Write ``new`` at cache rows start.. and return the last position's logits [1, vocab]."""
        n = len(new)
        logits = self.backend.step(self._state, np.array([new], dtype=np.int64),
                                   np.arange(start, start + n, dtype=np.int64)[None],
                                   np.array([start], dtype=np.int64), np.array([start + n], dtype=np.int64))
        return _host(logits[:, -1]).copy()

    def _decode(self, logits: np.ndarray, on_text: Callable[[str], None] | None) -> tuple[list[int], str]:
        budget = min(self.max_new_tokens, self.max_seq - len(self.cached))
        stream = self.tokenizer.stream()
        out: list[int] = []
        while True:
            token = int(_host(self._sampler.sample(logits).tokens)[0])
            if token in self.end_ids:
                reason = "stop"
                break
            out.append(token)
            self._sampler.observe(np.array([token], dtype=np.int64))
            if on_text is not None and (piece := stream.push(token)):
                on_text(piece)
            if len(out) >= budget:
                reason = "length"
                break
            logits = self._run([token], len(self.cached))
            self.cached.append(token)
        if on_text is not None and (piece := stream.flush()):
            on_text(piece)
        return out, reason


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _host(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()
