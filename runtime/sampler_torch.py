"""Torch backend of ``decodekit.runtime.sampler``: same math as the numpy kernels, all on the logits' device.

Nothing here reads a ``[batch, vocab]`` tensor back to the host, and nothing synchronizes on data
(no boolean indexing, no ``.item()``), so the whole step can be captured or overlapped on a GPU stream.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .sampler import SampleResult


def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last axis of [B, V] (first index among equal maxima, as torch.argmax), in two stages.

    One row of a 128K vocabulary is one long reduction, which torch.argmax runs on few blocks (35 us per decode
    step at batch 1 on an H100, 2% of a 1B model's step). Row maxima of chunks first, then the argmax of those:
    the chunk of the first maximum holds the first maximal index.
    """
    B, V = x.shape
    chunk = _chunk(V)
    if chunk is None:
        return x.argmax(dim=-1)
    values, within = x.reshape(B, V // chunk, chunk).max(dim=-1)
    best = values.argmax(dim=-1, keepdim=True)
    return torch.add(within.gather(-1, best), best, alpha=chunk).squeeze(-1)


@functools.lru_cache(maxsize=None)
def _chunk(V: int) -> int | None:
    return next((c for c in (1024, 512, 256, 128, 64) if V % c == 0 and V // c >= 8), None)


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of the ``k`` largest logits (lower index wins ties); ``k <= 0`` keeps all."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    x = logits.float()
    v = x.shape[-1]
    if k == 0 or k >= v:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    kth = torch.topk(x, k, dim=-1).values[..., -1:]
    gt = x > kth
    tie = x == kth
    room = k - gt.sum(dim=-1, keepdim=True)
    return gt | (tie & (tie.cumsum(dim=-1) <= room))


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep-mask of the shortest prefix (descending logit, lower index first) with softmax mass ``>= p``."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    x = logits.float()
    if p >= 1.0:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    vals, order = torch.sort(x, dim=-1, descending=True, stable=True)
    cum = vals.softmax(dim=-1).cumsum_(dim=-1)
    keep_sorted = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    keep_sorted[..., 1:] = cum[..., :-1] < p
    return torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)


def min_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep-mask of tokens whose probability is ``>= p * max_probability``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    x = logits.float()
    if p == 0.0:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    return (x - x.amax(dim=-1, keepdim=True)).exp_() >= p


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    rep: float,
    presence: float,
    frequency: float,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Repetition (prompt + output) then presence / frequency (output only) penalties, in fp32."""
    if out is None:
        out = logits.to(dtype=torch.float32, copy=True)
    elif out is not logits:
        out.copy_(logits)
    if rep != 1.0:
        seen = counts > 0
        if prompt_mask is not None:
            seen |= prompt_mask.to(dtype=torch.bool)
        penalized = torch.where(out > 0, out / rep, out * rep)
        torch.where(seen, penalized, out, out=out)
    if presence != 0.0 or frequency != 0.0:
        pen = counts.to(torch.float32).mul_(frequency)
        pen += torch.where(counts > 0, presence, 0.0)
        out -= pen
    return out


class TorchState:
    """Counts, scratch buffers and generator of the torch backend, all on one device."""

    def __init__(self, batch: int, vocab: int, seed: int | None, device: Any = None) -> None:
        self.counts = torch.zeros((batch, vocab), dtype=torch.int32, device=device)
        self.device = self.counts.device
        self.prompt_mask = torch.zeros((batch, vocab), dtype=torch.bool, device=self.device)
        self._x = torch.empty((batch, vocab), dtype=torch.float32, device=self.device)
        self._e = torch.empty_like(self._x)
        self._q = torch.empty_like(self._x)
        self._rows = torch.arange(batch, device=self.device)
        self._nan = torch.full((batch,), float("nan"), device=self.device)
        self._checked: Any = None
        self._seed = seed
        self._gen = torch.Generator(device=self.device)
        self._reseed()

    def _reseed(self) -> None:
        if self._seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(self._seed)

    @torch.no_grad()
    def reset(self, rows: list[int], cols: list[int]) -> None:
        self.counts.zero_()
        self.prompt_mask.zero_()
        r = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)
        c = torch.tensor(cols, dtype=torch.int64).to(self.device, non_blocking=True)
        self.prompt_mask[r, c] = True
        if self._seed is not None:
            self._reseed()

    @torch.no_grad()
    def observe(self, tokens: Any, active: Any | None) -> None:
        tok = torch.as_tensor(tokens).to(self.device, dtype=torch.int64).reshape(-1)
        if tok.shape != self._rows.shape:
            raise ValueError(f"tokens must have shape ({self._rows.shape[0]},), got {tuple(tok.shape)}")
        if tok.device.type == "cpu" and tok.numel() and (tok.min() < 0 or tok.max() >= self.counts.shape[1]):
            raise ValueError(f"token ids must be in [0, {self.counts.shape[1]}), got {tok.tolist()}")
        if active is None:
            inc = torch.ones_like(tok, dtype=torch.int32)
        else:
            inc = torch.as_tensor(active).to(self.device, dtype=torch.int32).reshape(-1)
        # one scatter-add into the flat counts (index_put_ with accumulate sorts its indices on CUDA)
        self.counts.view(-1).scatter_add_(0, self._rows * self.counts.shape[1] + tok, inc)

    def _check(self, logits: Any) -> None:
        if logits is self._checked:  # the decode loop passes the same view of a fixed buffer every step
            return
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise ValueError(f"torch backend needs a float torch.Tensor, got {type(logits).__name__}")
        if logits.shape != self._x.shape:
            raise ValueError(f"logits must have shape {tuple(self._x.shape)}, got {tuple(logits.shape)}")
        if logits.device != self.device:
            raise ValueError(f"logits are on {logits.device}, sampler state is on {self.device}")
        self._checked = logits

    def load(self, logits: Any) -> torch.Tensor:
        self._check(logits)
        with torch.no_grad():
            return self._x.copy_(logits)

    def argmax(self, logits: Any, logprobs: bool = True) -> SampleResult:
        """Greedy without penalties, straight from the logits (any float dtype): the argmax (first index on ties)
        and, with ``logprobs``, its log-probability under softmax(logits) in fp32 (else NaN)."""
        self._check(logits)
        if not logprobs:  # one pass on the CPU (first maximal index); two stages over long rows on a GPU
            return SampleResult(logits.argmax(dim=-1) if logits.device.type == "cpu" else argmax_last(logits),
                                self._nan)
        x = logits if logits.dtype == torch.float32 else logits.float()
        if x.device.type == "cpu":
            best, tok = x.max(dim=-1)  # one pass; the first maximal index
        else:
            tok = argmax_last(x)
            best = x.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        return SampleResult(tok, best - torch.logsumexp(x, dim=-1))

    @staticmethod
    def drop(x: torch.Tensor, keep: torch.Tensor) -> None:
        x.masked_fill_(~keep, float("-inf"))

    def _exp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = x.amax(dim=-1, keepdim=True)
        torch.sub(x, m, out=self._e).exp_()
        return m.squeeze(-1), self._e.sum(dim=-1)

    @staticmethod
    def _result(x: torch.Tensor, tok: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> SampleResult:
        lp = x.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - m - s.log()
        return SampleResult(tok, lp)

    @torch.no_grad()
    def greedy(self, x: torch.Tensor) -> SampleResult:
        m, s = self._exp(x)
        return self._result(x, argmax_last(x), m, s)

    @torch.no_grad()
    def draw(self, x: torch.Tensor) -> SampleResult:
        m, s = self._exp(x)
        q = self._q.exponential_(generator=self._gen).clamp_min_(torch.finfo(torch.float32).tiny)
        torch.div(self._e, q, out=q)
        return self._result(x, argmax_last(q), m, s)
