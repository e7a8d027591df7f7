"""Rotary-embedding frequency tables with the RoPE scaling variants of the Llama/Qwen families."""

from __future__ import annotations

import math

import torch

from .config import ModelConfig, RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim/2], fp32, after scaling (same formulas as transformers)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        return _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def cos_sin_tables(config: ModelConfig, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [positions, head_dim/2] in fp32, on the default device but computed on the CPU (the
    same numbers everywhere; on the meta device torch would run these ops through Python decompositions, whose
    first use imports torch._dynamo: most of an export that traces nothing)."""
    device = torch.get_default_device()
    with torch.device("cpu"):
        inv_freq = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        freqs_PD2 = torch.arange(positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        return freqs_PD2.cos().to(device), freqs_PD2.sin().to(device)
