"""Token sampler of the decode loop: penalties, temperature, top-k / top-p / min-p, seeded draws.

Per step, per row, in fp32, in this order:

1. repetition penalty (HF): for tokens seen in the prompt or the output, ``logit > 0 ? logit / r : logit * r``;
2. presence / frequency penalties (OpenAI, generated tokens only): ``logit -= presence * (count > 0) + frequency * count``;
3. ``temperature == 0``: greedy argmax (first index on ties); the logprob is under softmax of the penalized logits;
4. otherwise ``logits /= temperature``, then top-k, top-p, min-p (each filter sees the distribution left by the
   previous one), renormalize, and draw by the exponential race ``argmax_i p_i / E_i`` with ``E_i ~ Exp(1)``,
   which picks ``i`` with probability ``p_i``.

Filters keep exactly what they promise, ties broken by lower token index: top-k keeps ``k`` tokens,
top-p the shortest sorted prefix whose mass reaches ``p``, min-p every token with ``p_i >= min_p * p_max``.
Every row needs at least one finite logit. The torch backend keeps all ``[batch, vocab]`` work on its device;
only the ``[batch]`` tokens / logprobs come out, still on that device.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    import torch

Array = Union[np.ndarray, "torch.Tensor"]

MIN_TEMPERATURE = 1e-5
MAX_OPENAI_PENALTY = 2.0


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling knobs; defaults are greedy with every filter and penalty off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: bool = True  # False: the caller reads no log-probs (NaN where skipped: greedy skips the log-softmax)

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        t = self.temperature
        if t != 0.0 and not t >= MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {t!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -MAX_OPENAI_PENALTY <= v <= MAX_OPENAI_PENALTY:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be True or False, got {self.logprobs!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when tokens are the argmax of the penalized logits."""
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """True when any penalty changes the logits."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class SampleResult(NamedTuple):
    """tokens: int64 [batch]; logprobs: fp32 [batch], log-prob of each token under the final distribution."""

    tokens: Array
    logprobs: Array


# ----------------------------------------------------------------------------------------------- public filters


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _torch_impl():  # noqa: ANN202 - module handle
    from . import sampler_torch

    return sampler_torch


def top_k_mask(logits: Array, k: int) -> Array:
    """Keep-mask of the ``k`` largest logits along the last axis (lower index wins ties); ``k <= 0`` keeps all."""
    if _is_torch(logits):
        return _torch_impl().top_k_mask(logits, k)
    return _np_top_k_mask(np.asarray(logits, dtype=np.float32), k)


def top_p_mask(logits: Array, p: float) -> Array:
    """Keep-mask of the shortest prefix (by descending logit, lower index first) with softmax mass ``>= p``.

    ``p == 1`` keeps every token (the filter is off), zero-probability ones included.
    """
    if _is_torch(logits):
        return _torch_impl().top_p_mask(logits, p)
    return _np_top_p_mask(np.asarray(logits, dtype=np.float32), p)


def min_p_mask(logits: Array, p: float) -> Array:
    """Keep-mask of tokens whose probability is ``>= p * max_probability``."""
    if _is_torch(logits):
        return _torch_impl().min_p_mask(logits, p)
    return _np_min_p_mask(np.asarray(logits, dtype=np.float32), p)


def apply_penalties(
    logits: Array,
    output_counts: Array,
    prompt_mask: Array | None = None,
    *,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    out: Array | None = None,
) -> Array:
    """Penalized fp32 logits [..., vocab] (steps 1-2 of the module docstring); written to ``out`` when given.

    ``output_counts``: generated-token counts; ``prompt_mask``: bool, tokens present in the prompt.
    """
    if _is_torch(logits):
        fn = _torch_impl().apply_penalties
    else:
        fn = _np_apply_penalties
    return fn(logits, output_counts, prompt_mask, repetition_penalty, presence_penalty, frequency_penalty, out)


# ------------------------------------------------------------------------------------------------ numpy kernels


def _np_top_k_mask(x: np.ndarray, k: int) -> np.ndarray:
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    v = x.shape[-1]
    if k == 0 or k >= v:
        return np.ones(x.shape, dtype=bool)
    kth = np.partition(x, v - k, axis=-1)[..., v - k : v - k + 1]
    gt = x > kth
    tie = x == kth
    room = k - gt.sum(axis=-1, keepdims=True)
    return gt | (tie & (np.cumsum(tie, axis=-1) <= room))


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def _np_top_p_mask(x: np.ndarray, p: float) -> np.ndarray:
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    if p >= 1.0:
        return np.ones(x.shape, dtype=bool)
    order = np.argsort(-x, axis=-1, kind="stable")
    cum = np.cumsum(_np_softmax(np.take_along_axis(x, order, axis=-1)), axis=-1)
    keep_sorted = np.ones(x.shape, dtype=bool)
    keep_sorted[..., 1:] = cum[..., :-1] < p
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep


def _np_min_p_mask(x: np.ndarray, p: float) -> np.ndarray:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if p == 0.0:
        return np.ones(x.shape, dtype=bool)
    return np.exp(x - x.max(axis=-1, keepdims=True)) >= np.float32(p)


def _np_apply_penalties(
    logits: np.ndarray,
    counts: np.ndarray,
    prompt_mask: np.ndarray | None,
    rep: float,
    presence: float,
    frequency: float,
    out: np.ndarray | None,
) -> np.ndarray:
    if out is None:
        out = np.array(logits, dtype=np.float32)
    elif out is not logits:
        np.copyto(out, logits)
    counts = np.asarray(counts)
    if rep != 1.0:
        seen = counts > 0
        if prompt_mask is not None:
            seen |= np.asarray(prompt_mask, dtype=bool)
        pos = out > 0
        np.divide(out, np.float32(rep), out=out, where=seen & pos)
        np.multiply(out, np.float32(rep), out=out, where=seen & ~pos)
    if presence != 0.0 or frequency != 0.0:
        pen = counts.astype(np.float32)
        pen *= np.float32(frequency)
        np.add(pen, np.float32(presence), out=pen, where=counts > 0)
        out -= pen
    return out


class _NumpyState:
    """Counts, scratch buffers and RNG of the numpy backend."""

    def __init__(self, batch: int, vocab: int, seed: int | None) -> None:
        self.counts = np.zeros((batch, vocab), dtype=np.int32)
        self.prompt_mask = np.zeros((batch, vocab), dtype=bool)
        self._x = np.empty((batch, vocab), dtype=np.float32)
        self._e = np.empty_like(self._x)
        self._q = np.empty_like(self._x)
        self._rows = np.arange(batch)
        self._seed = seed
        self._rng = np.random.default_rng(seed)

    def reset(self, rows: list[int], cols: list[int]) -> None:
        self.counts.fill(0)
        self.prompt_mask.fill(False)
        self.prompt_mask[np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)] = True
        if self._seed is not None:
            self._rng = np.random.default_rng(self._seed)

    def observe(self, tokens: Any, active: Any | None) -> None:
        tok = _np_tokens(tokens, self._rows.shape[0], self.counts.shape[1])
        inc = 1 if active is None else np.asarray(active, dtype=bool).reshape(-1).astype(np.int32)
        self.counts[self._rows, tok] += inc

    def load(self, logits: Array) -> np.ndarray:
        if not isinstance(logits, np.ndarray) or not np.issubdtype(logits.dtype, np.floating):
            raise ValueError(f"numpy backend needs a float np.ndarray, got {type(logits).__name__}")
        if logits.shape != self._x.shape:
            raise ValueError(f"logits must have shape {self._x.shape}, got {logits.shape}")
        np.copyto(self._x, logits)
        return self._x

    @staticmethod
    def drop(x: np.ndarray, keep: np.ndarray) -> None:
        np.copyto(x, -np.inf, where=~keep)

    def _exp(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = x.max(axis=-1, keepdims=True)
        np.subtract(x, m, out=self._e)
        np.exp(self._e, out=self._e)
        return m[:, 0], self._e.sum(axis=-1)

    def _result(self, x: np.ndarray, tok: np.ndarray, m: np.ndarray, s: np.ndarray) -> SampleResult:
        lp = x[self._rows, tok] - m - np.log(s)
        return SampleResult(tok.astype(np.int64), lp.astype(np.float32))

    def greedy(self, x: np.ndarray) -> SampleResult:
        m, s = self._exp(x)
        return self._result(x, x.argmax(axis=-1), m, s)

    def draw(self, x: np.ndarray) -> SampleResult:
        m, s = self._exp(x)
        q = self._rng.standard_exponential(out=self._q, dtype=np.float32)
        np.maximum(q, np.finfo(np.float32).tiny, out=q)
        np.divide(self._e, q, out=q)
        return self._result(x, q.argmax(axis=-1), m, s)


def _np_tokens(tokens: Any, batch: int, vocab: int) -> np.ndarray:
    tok = np.asarray(tokens).reshape(-1).astype(np.int64)
    if tok.shape != (batch,):
        raise ValueError(f"tokens must have shape ({batch},), got {tok.shape}")
    if tok.size and (tok.min() < 0 or tok.max() >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}), got min {tok.min()} max {tok.max()}")
    return tok


# ------------------------------------------------------------------------------------------------------ sampler


class Sampler:
    """Stateful per-batch sampler: ``reset`` once per prompt batch, then ``sample`` / ``observe`` each step."""

    def __init__(
        self,
        config: SamplingConfig,
        batch_size: int,
        vocab_size: int,
        backend: str = "numpy",
        device: Any = None,
    ) -> None:
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not _is_int(vocab_size) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        self.config = config
        self.batch_size = batch_size
        self.vocab_size = vocab_size
        self.backend = backend
        if backend == "numpy":
            if device not in (None, "cpu"):
                raise ValueError(f"numpy backend runs on the cpu, got device={device!r}")
            self._state: Any = _NumpyState(batch_size, vocab_size, config.seed)
        elif backend == "torch":
            self._state = _torch_impl().TorchState(batch_size, vocab_size, config.seed, device)
        else:
            raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")

    @property
    def output_counts(self) -> Array:
        """int32 [batch, vocab]: how often each token was generated (observed) per row."""
        return self._state.counts

    @property
    def prompt_mask(self) -> Array:
        """bool [batch, vocab]: tokens present in each row's prompt."""
        return self._state.prompt_mask

    def reset(self, prompt_ids: Sequence[Sequence[int]]) -> None:
        """Zero the state, mark prompt tokens (repetition penalty only), and re-seed when a seed is set."""
        if len(prompt_ids) != self.batch_size:
            raise ValueError(f"prompt_ids must have {self.batch_size} rows, got {len(prompt_ids)}")
        rows = [b for b, ids in enumerate(prompt_ids) for _ in ids]
        cols = [int(t) for ids in prompt_ids for t in ids]
        if cols and (min(cols) < 0 or max(cols) >= self.vocab_size):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got min {min(cols)} max {max(cols)}")
        self._state.reset(rows, cols)

    def observe(self, tokens: Any, active: Any | None = None) -> None:
        """Count the chosen tokens [batch] as generated; rows where ``active`` is False are left unchanged."""
        self._state.observe(tokens, active)

    def sample(self, logits: Array) -> SampleResult:
        """Process ``logits`` [batch, vocab] (see module docstring) and pick one token per row."""
        cfg, st = self.config, self._state
        if cfg.greedy and not cfg.has_penalties and self.backend == "torch":
            return st.argmax(logits, cfg.logprobs)  # no copy of the logits
        x = st.load(logits)
        if cfg.has_penalties:
            apply_penalties(
                x,
                st.counts,
                st.prompt_mask,
                repetition_penalty=cfg.repetition_penalty,
                presence_penalty=cfg.presence_penalty,
                frequency_penalty=cfg.frequency_penalty,
                out=x,
            )
        if cfg.greedy:
            return st.greedy(x)
        x /= cfg.temperature
        if 0 < cfg.top_k < self.vocab_size:
            st.drop(x, top_k_mask(x, cfg.top_k))
        if cfg.top_p < 1.0:
            st.drop(x, top_p_mask(x, cfg.top_p))
        if cfg.min_p > 0.0:
            st.drop(x, min_p_mask(x, cfg.min_p))
        return st.draw(x)
