"""Rotary-embedding tables: transformers' RoPE types as static cos/sin tables of an artifact.

An artifact serves positions [0, positions) (positions = --max-seq) with ONE table, computed here with
transformers' own formulas (``modeling_rope_utils``: same operations, same order, float32). Two types pick their
frequencies from the running sequence length in transformers, at every forward call; a static table cannot follow
that, so it is computed for the longest sequence the artifact serves:

- dynamic (NTK): transformers keeps the default frequencies while max(position_ids) + 1 <= max_position_embeddings
  and recomputes the base from the running length beyond. positions <= max_position_embeddings: the default
  table, exact for every sequence. positions > max_position_embeddings: the table of length `positions`, exact for
  a forward over that many positions; shorter sequences get those frequencies where transformers uses others.
- longrope: transformers uses short_factor while max(position_ids) + 1 <= original_max_position_embeddings and
  long_factor beyond (keys already in its cache keep the rotation they got). positions <= original: short, exact
  for every sequence. positions > original: long, exact for every step whose positions reach beyond original (a
  prompt longer than original_max_position_embeddings); a sequence that starts shorter gets long-factor rotations
  where transformers uses short ones. Export with --max-seq <= original_max_position_embeddings to serve short
  contexts exactly.

``static_table_note`` says which of these applies to an export, in one line.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import ModelConfig, RopeScaling

# (config, rotary dim, positions served) -> (inv_freq [dim/2] fp32, attention factor multiplying cos and sin)
InvFreq = Callable[[ModelConfig, int, int], tuple[torch.Tensor, float]]


def _exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def _default(c: ModelConfig, dim: int, positions: int) -> tuple[torch.Tensor, float]:
    return 1.0 / (c.rope_theta ** _exponents(dim)), 1.0


def _linear(c: ModelConfig, dim: int, positions: int) -> tuple[torch.Tensor, float]:
    return _default(c, dim, positions)[0] / c.rope_scaling.factor, 1.0


def _dynamic(c: ModelConfig, dim: int, positions: int) -> tuple[torch.Tensor, float]:
    """_compute_dynamic_ntk_parameters: at init (python floats, seq_len = max_position_embeddings) up to
    max_position_embeddings; beyond, as its update computes it from a tensor length (float32 arithmetic)."""
    mpe, factor = c.max_position_embeddings, c.rope_scaling.factor
    if positions <= mpe:
        base = c.rope_theta * ((factor * mpe / mpe) - (factor - 1)) ** (dim / (dim - 2))
    else:
        seq_len = torch.tensor(positions, dtype=torch.int64)
        base = c.rope_theta * ((factor * seq_len / mpe) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** _exponents(dim)), 1.0


def _llama3(c: ModelConfig, dim: int, positions: int) -> tuple[torch.Tensor, float]:
    s = c.rope_scaling
    inv_freq = _default(c, dim, positions)[0]
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _yarn_mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(c: ModelConfig, dim: int, positions: int) -> tuple[torch.Tensor, float]:
    """_compute_yarn_parameters: interpolate low frequencies by `factor`, keep high ones, ramp in between."""
    s, base = c.rope_scaling, c.rope_theta
    factor = s.factor if s.factor is not None else c.max_position_embeddings / s.original_max_position_embeddings
    attention = s.attention_factor
    if attention is None:
        attention = (float(_yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim))
                     if s.mscale and s.mscale_all_dim else _yarn_mscale(factor))
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, attention


def _longrope(c: ModelConfig, dim: int, positions: int) -> tuple[torch.Tensor, float]:
    """_compute_longrope_parameters: long_factor when the served length exceeds original_max_position_embeddings."""
    s = c.rope_scaling
    original = s.original_max_position_embeddings
    factor = s.factor if s.factor is not None else c.max_position_embeddings / original
    attention = s.attention_factor
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = torch.tensor(s.long_factor if positions > original else s.short_factor, dtype=torch.float32)
    return 1.0 / (ext * c.rope_theta ** _exponents(dim)), attention


INV_FREQ: dict[str, InvFreq] = {"default": _default, "linear": _linear, "dynamic": _dynamic, "llama3": _llama3,
                                "yarn": _yarn, "longrope": _longrope}


def inv_frequencies(config: ModelConfig, positions: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim/2] fp32, attention factor) for an artifact serving `positions` positions."""
    return INV_FREQ[config.rope_scaling.kind](config, config.rotary_dim, positions)


def cos_sin_tables(config: ModelConfig, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [positions, rotary_dim/2] in fp32, the attention factor applied (as transformers does),
    on the default device but computed on the CPU (the same numbers everywhere; on the meta device torch would run
    these ops through Python decompositions, whose first use imports torch._dynamo: most of an export that traces
    nothing)."""
    device = torch.get_default_device()
    with torch.device("cpu"):
        inv_freq, attention = inv_frequencies(config, positions)
        freqs_PR2 = torch.arange(positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        return (freqs_PR2.cos() * attention).to(device), (freqs_PR2.sin() * attention).to(device)


def static_table_note(config: ModelConfig, positions: int) -> str | None:
    """One line when the static table differs from transformers for some sequences of the artifact (see above)."""
    s: RopeScaling = config.rope_scaling
    if s.kind == "dynamic" and positions > config.max_position_embeddings:
        return (f"RoPE dynamic: the table is NTK-scaled for {positions} positions (--max-seq); transformers scales by "
                f"the running length and keeps the default frequencies up to max_position_embeddings "
                f"{config.max_position_embeddings}: sequences shorter than {positions} differ from it")
    if s.kind == "longrope" and positions > s.original_max_position_embeddings:
        return (f"RoPE longrope: --max-seq {positions} > original_max_position_embeddings "
                f"{s.original_max_position_embeddings}, so every position uses long_factor; transformers uses "
                f"short_factor while a sequence is within {s.original_max_position_embeddings} tokens (export with "
                f"--max-seq {s.original_max_position_embeddings} or less for that)")
    return None
