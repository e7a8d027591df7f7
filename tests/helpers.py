"""Shared test helpers (importable as ``helpers``: tests/conftest.py puts tests/ on sys.path).

- ``FAMILIES``: the Hugging Face families decodekit supports, for ``pytest.mark.parametrize``.
- ``build_hf_checkpoint(family, folder)``: a small, seeded, random checkpoint written with
  transformers' own classes (the ``hf_checkpoint`` fixture in conftest.py caches one per family).
- ``greedy_reference(model, prompt_ids, new_tokens, max_seq)``: greedy decoding that drives
  ``decodekit.export.model.Decoder`` directly (prefill, then one-token decode steps).
- ``transformers_greedy(folder, prompt, new)`` / ``ort_greedy(artifact, prompt, new)``: greedy tokens of
  transformers' generate() on a checkpoint folder / of decodekit's decode loop on an artifact (ONNX Runtime CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")

# Shared small shapes; each family adds the features it should exercise.
BASE_SHAPE: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
)

FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    # llama3 rope scaling: positions beyond original_max_position_embeddings=64 hit all three bands.
    "llama": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(sliding_window=None, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2": dict(tie_word_embeddings=True),  # q/k/v biases are built into Qwen2 attention
    "qwen3": dict(head_dim=32),  # q/k RMSNorm; q_size (128) != hidden_size (64)
    # fused qkv_proj / gate_up_proj, rotary on half of each head, longrope within original_max_position_embeddings
    # (short factors: the tests export at most 192 positions) with its attention factor (factor 512/256 = 2)
    "phi3": dict(pad_token_id=0, partial_rotary_factor=0.5, original_max_position_embeddings=256,
                 rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.25, 1.5, 2.0],
                               "long_factor": [1.5, 2.0, 4.0, 8.0]}),
    # 4 layers alternating sliding (window 8, shorter than every test's prompt + generation) / full attention,
    # soft-capped attention scores and logits, query scale from query_pre_attn_scalar (not head_dim). Untied:
    # a random tied Gemma (embeddings x sqrt(hidden)) greedily repeats its last token.
    "gemma2": dict(num_hidden_layers=4, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                   attn_logit_softcapping=4.0, final_logit_softcapping=8.0, tie_word_embeddings=False),
    # sliding layers with the local RoPE base, full layers with the global base and linear scaling; q/k norm
    "gemma3_text": dict(num_hidden_layers=4, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                        tie_word_embeddings=False,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                     "sliding_attention"],
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 100000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
}

_SEEDS = {f: i for i, f in enumerate(FAMILIES)}


def hf_classes(family: str):
    """(ConfigClass, ForCausalLMClass) of transformers for a family name."""
    import transformers as tf

    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
    }[family]


def hf_config(family: str, **overrides: Any):
    config_cls, _ = hf_classes(family)
    kw = {**BASE_SHAPE, **FAMILY_CONFIG[family], **overrides}
    try:
        return config_cls(**kw)
    except (TypeError, ValueError, KeyError):
        if "rope_scaling" not in FAMILY_CONFIG[family] or "rope_scaling" in overrides:
            raise
        kw.pop("rope_scaling")  # a config class that refuses this scaling: fall back to default RoPE
        return config_cls(**kw)


def init_weights_(model: torch.nn.Module, seed: int) -> None:
    """Large-ish random weights so logits are far from uniform and greedy decoding varies."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights are listed once
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def build_hf_checkpoint(family: str, folder: str | Path, **overrides: Any) -> Path:
    """Write a seeded random ``family`` checkpoint (config.json + model.safetensors) into ``folder``."""
    _, model_cls = hf_classes(family)
    config = hf_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEEDS[family])
        model = model_cls(config).to(torch.float32).eval()
    init_weights_(model, seed=1000 + _SEEDS[family])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


@torch.no_grad()
def greedy_reference(model, prompt_ids: list[int], new_tokens: int, max_seq: int) -> list[int]:
    """Greedy-decode ``new_tokens`` tokens after ``prompt_ids`` (batch 1) with a decodekit Decoder.

    Returns only the generated ids (not the prompt). Uses a fresh static cache of ``max_seq`` rows:
    one prefill step (write_indices=0, nonpad_kv_seqlen=len(prompt)), then one-token decode steps.
    """
    n = len(prompt_ids)
    if n == 0 or n + new_tokens > max_seq:
        raise ValueError(f"prompt of {n} tokens + {new_tokens} new tokens does not fit max_seq={max_seq}")
    cache = model.new_cache(1, max_seq)
    ids_BS = torch.tensor([prompt_ids], dtype=torch.long)
    pos_BS = torch.arange(n, dtype=torch.long)[None]
    write_B = torch.zeros(1, dtype=torch.long)
    nonpad_B = torch.tensor([n], dtype=torch.long)
    out: list[int] = []
    for _ in range(new_tokens):
        logits, cache = model(ids_BS, pos_BS, write_B, nonpad_B, cache, logits="last")
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        write_B = nonpad_B.clone()
        pos_BS = write_B[:, None].clone()
        nonpad_B = nonpad_B + 1
        ids_BS = torch.tensor([[tok]], dtype=torch.long)
    return out


def edit_manifest(folder: str | Path, edit) -> dict:
    """Rewrite folder/manifest.json through ``edit(dict) -> None`` and re-seal its checksum, as a tool writing a
    consistent manifest would (a bare edit is refused as a corrupted manifest); returns the new dict."""
    import json

    from decodekit.export.manifest import CHECKSUM, manifest_checksum

    path = Path(folder) / "manifest.json"
    d = json.loads(path.read_text())
    edit(d)
    d[CHECKSUM] = manifest_checksum(d)
    path.write_text(json.dumps(d, indent=2))
    return d


def transformers_greedy(folder: Path, prompt: list[int], new: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def ort_greedy(artifact: Path, prompt: list[int], new: int) -> list[int]:
    from decodekit.runtime.generate import generate_ids
    from decodekit.runtime.pipeline import open_backend

    with open_backend(artifact, "ort") as backend:
        return generate_ids(backend, [prompt], new, eos_ids=())[0]
