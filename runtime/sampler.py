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
Every row needs at least one finite logit. One implementation (runtime/sampler_torch.py) keeps all
``[batch, vocab]`` work on the logits' device; only the ``[batch]`` tokens / logprobs come out, still on that
device. ``backend="numpy"`` takes and returns numpy arrays through the same kernels (CPU tensors sharing memory).
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


def _via_torch(logits: Array, fn: Any, *args: Any) -> Array:
    """Run a torch kernel on torch logits as they are, or on numpy logits (fp32 view) returning numpy."""
    if _is_torch(logits):
        return fn(logits, *args)
    import torch

    return fn(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), *args).numpy()


def top_k_mask(logits: Array, k: int) -> Array:
    """Keep-mask of the ``k`` largest logits along the last axis (lower index wins ties); ``k <= 0`` keeps all."""
    return _via_torch(logits, _torch_impl().top_k_mask, k)


def top_p_mask(logits: Array, p: float) -> Array:
    """Keep-mask of the shortest prefix (by descending logit, lower index first) with softmax mass ``>= p``.

    ``p == 1`` keeps every token (the filter is off), zero-probability ones included.
    """
    return _via_torch(logits, _torch_impl().top_p_mask, p)


def min_p_mask(logits: Array, p: float) -> Array:
    """Keep-mask of tokens whose probability is ``>= p * max_probability``."""
    return _via_torch(logits, _torch_impl().min_p_mask, p)


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
    fn = _torch_impl().apply_penalties
    if _is_torch(logits):
        return fn(logits, output_counts, prompt_mask, repetition_penalty, presence_penalty, frequency_penalty, out)
    import torch

    t = torch.from_numpy  # numpy in, numpy out: views, so ``out`` is written in place
    x = t(np.ascontiguousarray(logits, dtype=np.float32))
    result = fn(x, t(np.asarray(output_counts)), None if prompt_mask is None else t(np.asarray(prompt_mask)),
                repetition_penalty, presence_penalty, frequency_penalty, None if out is None else t(out))
    return out if out is not None else result.numpy()


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
        if backend not in ("numpy", "torch"):
            raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")
        if backend == "numpy" and device not in (None, "cpu"):
            raise ValueError(f"numpy backend runs on the cpu, got device={device!r}")
        # one implementation: the torch kernels; "numpy" means numpy arrays in and out (CPU tensors sharing memory)
        self._state: Any = _torch_impl().TorchState(batch_size, vocab_size, config.seed, device)

    def _out(self, t: Any) -> Array:
        return t.numpy() if self.backend == "numpy" else t

    @property
    def output_counts(self) -> Array:
        """int32 [batch, vocab]: how often each token was generated (observed) per row."""
        return self._out(self._state.counts)

    @property
    def prompt_mask(self) -> Array:
        """bool [batch, vocab]: tokens present in each row's prompt."""
        return self._out(self._state.prompt_mask)

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
        if self.backend == "torch":
            return self._sample(logits)
        if not isinstance(logits, np.ndarray) or not np.issubdtype(logits.dtype, np.floating):
            raise ValueError(f"numpy backend needs a float np.ndarray, got {type(logits).__name__}")
        import torch

        result = self._sample(torch.from_numpy(np.ascontiguousarray(logits)))
        return SampleResult(result.tokens.numpy(), result.logprobs.numpy())

    def _sample(self, logits: Any) -> SampleResult:
        cfg, st = self.config, self._state
        if cfg.greedy and not cfg.has_penalties:
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
