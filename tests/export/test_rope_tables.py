"""RoPE tables against transformers' own rotary embedding: the cos/sin it computes in a forward over P positions.

Each case builds the family's transformers config, reads it with decodekit's accounting (config.json -> ModelConfig)
and compares decodekit's static table of P rows (export/rope.py) with what transformers' rotary module returns for
position_ids = arange(P), bit for bit. No model weights: these are fast.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from decodekit.export.config import account
from decodekit.export.rope import cos_sin_tables, static_table_note
from helpers import hf_classes, hf_config

LONG = [1.5, 2.0, 4.0, 8.0]  # phi3 test shape: head_dim 16, partial 0.5 -> 4 frequencies
SHORT = [1.0, 1.25, 1.5, 2.0]

# (id, family, transformers config overrides, positions P)
CASES: list[tuple[str, str, dict[str, Any], int]] = [
    ("linear", "llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, 96),
    ("llama3", "llama", {}, 96),
    ("dynamic-within", "llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, 96),
    ("dynamic-within-odd-mpe", "qwen2", {"max_position_embeddings": 100,
                                         "rope_scaling": {"rope_type": "dynamic", "factor": 3.7}}, 100),
    ("dynamic-beyond", "llama", {"max_position_embeddings": 64,
                                 "rope_scaling": {"rope_type": "dynamic", "factor": 3.0}}, 96),
    ("yarn", "mistral", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                          "original_max_position_embeddings": 64}}, 96),
    ("yarn-mscale-betas-untruncated", "qwen2", {"rope_scaling": {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "mscale": 1.0,
        "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2, "truncate": False}}, 96),
    ("yarn-attention_factor", "qwen3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                         "attention_factor": 1.25}}, 64),
    ("longrope-llama-long", "llama", {"rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 32,
                                                       "short_factor": [1.0 + i / 8 for i in range(8)],
                                                       "long_factor": [2.0 + i for i in range(8)]}}, 96),
    ("phi3-longrope-short", "phi3", {}, 96),
    ("phi3-longrope-long", "phi3", {"original_max_position_embeddings": 16}, 96),
    ("phi3-longrope-factors-given", "phi3", {"rope_scaling": {
        "rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "factor": 3.0,
        "attention_factor": 1.1}, "original_max_position_embeddings": 16}, 64),
    ("phi3-yarn-read-as-longrope", "phi3", {"rope_scaling": {"type": "yarn", "short_factor": SHORT,
                                                             "long_factor": LONG}}, 96),
    ("phi3-partial-default", "phi3", {"partial_rotary_factor": 0.75, "rope_scaling": None}, 64),
]


def transformers_cos_sin(family: str, overrides: dict[str, Any], positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [P, rotary_dim] of transformers' rotary module in a forward over positions 0..P-1 (fp32)."""
    _, model_cls = hf_classes(family)
    config = hf_config(family, **overrides)
    with torch.device("meta"):
        rotary_cls = type(model_cls(config).model.rotary_emb)
    rotary = rotary_cls(config)
    x = torch.zeros(1, positions, 8)
    cos, sin = rotary(x, position_ids=torch.arange(positions)[None])
    return cos[0], sin[0]


@pytest.mark.parametrize("family,overrides,positions", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_tables_equal_transformers_forward(family, overrides, positions):
    config = account(hf_config(family, **overrides).to_dict()).config
    cos, sin = cos_sin_tables(config, positions)
    ref_cos, ref_sin = transformers_cos_sin(family, overrides, positions)
    half = ref_cos.shape[-1] // 2
    assert cos.shape == (positions, config.rotary_dim // 2) and 2 * half == config.rotary_dim
    assert torch.equal(ref_cos[:, :half], ref_cos[:, half:])  # transformers' emb = cat(freqs, freqs)
    assert torch.equal(cos, ref_cos[:, :half]) and torch.equal(sin, ref_sin[:, :half])


def test_attention_factor_and_regime_are_data():
    """yarn / longrope carry their cos/sin scaling in the tables; the long regime is picked by the served length."""
    longrope = account(hf_config("phi3").to_dict()).config  # factor 512 / 256 = 2: attention factor > 1
    assert longrope.rope_scaling.kind == "longrope" and longrope.rotary_dim == 8
    cos, _ = cos_sin_tables(longrope, 96)
    assert cos[0].max().item() > 1.06  # cos(0) * attention factor sqrt(1 + ln 2 / ln 256)
    assert static_table_note(longrope, 256) is None
    note = static_table_note(longrope, 257)
    assert note is not None and "long_factor" in note and "--max-seq 256 or less" in note
    dynamic = account(hf_config("llama", max_position_embeddings=64,
                                rope_scaling={"rope_type": "dynamic", "factor": 2.0}).to_dict()).config
    assert static_table_note(dynamic, 64) is None and "NTK-scaled for 96 positions" in static_table_note(dynamic, 96)
    dynamic.check_max_seq(96)  # dynamic serves beyond max_position_embeddings; others are refused there


def test_phi3_fields_read_as_transformers_config_reads_them():
    """Phi3Config: original_max_position_embeddings is its own top-level field (default 4096, winning over the RoPE
    parameters' value), partial_rotary_factor inside rope_parameters wins over the top-level one."""
    hf = hf_config("phi3").to_dict()
    params = {**hf["rope_parameters"], "original_max_position_embeddings": 999}
    config = account({**hf, "rope_parameters": params}).config
    assert config.rope_scaling.original_max_position_embeddings == hf["original_max_position_embeddings"] == 256
    params = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}
    config = account({**hf, "rope_parameters": params, "partial_rotary_factor": 0.75}).config
    assert config.partial_rotary_factor == 0.25 and config.rotary_dim == 4
    without = {k: v for k, v in hf.items() if k != "original_max_position_embeddings"}
    assert account(without).config.rope_scaling.original_max_position_embeddings == 4096
    llama = account(hf_config("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}).to_dict()).config
    assert llama.rope_scaling.original_max_position_embeddings == 512  # transformers' default: max_position_embeddings
