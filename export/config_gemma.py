"""Config accounting of the Gemma 2 and Gemma 3 (text) families: their config.json fields as rules.

The rule kinds are ``config_fields``'s. Where config.json may lack a field (checkpoints written by older
transformers), the value is transformers' own class default, as its config class would read it.

    Gemma2ForCausalLM   gemma2        sandwich norms, softcapped attention logits and final logits, alternating
                                      sliding (even layers) / full attention, one RoPE
    Gemma3ForCausalLM   gemma3_text   sandwich norms, q/k norm, sliding_window_pattern (5 sliding : 1 full),
                                      local RoPE base for sliding layers (rope_local_base_freq), global RoPE
                                      (with its scaling) for full layers; final-logit softcap when set

Both scale embeddings by sqrt(hidden_size) and store each RMSNorm scale as weight - 1 (``Family.norm_offset``).
"""

from __future__ import annotations

from typing import Any, Mapping

from .config_fields import (COMMON, HIDDEN_ACT, Choice, Copy, Derived, Ignored, Read, Refused, Rule, describe,
                            layer_types_problem, read_attention_bias_qkvo, read_rope)

GEMMA2_WINDOW_PATTERN = 2  # transformers' Gemma2Config: layer i slides when (i + 1) % 2
GEMMA3_WINDOW_PATTERN = 6  # Gemma3TextConfig's sliding_window_pattern default
DEFAULT_WINDOW = 4096  # both config classes' sliding_window default


def _softcap(key: str, to: str, default: float | None) -> Derived:
    """A soft-capping value: absent -> the class default, null -> none, else a positive number."""

    def read(hf: Mapping[str, Any]) -> Read:
        value = hf[key] if key in hf else default
        if value is None:
            return {to: None}, None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            return {}, f"config.json field {key}={describe(value)} is not a positive number or null"
        return {to: float(value)}, None

    return Derived((key,), read)


def _window(pattern_keys: tuple[str, ...], default_pattern: int) -> Derived:
    """layer_types (or, when absent, every `pattern`-th layer full, the others sliding) and sliding_window."""

    def read(hf: Mapping[str, Any]) -> Read:
        layers = int(hf.get("num_hidden_layers") or 0)
        types = hf.get("layer_types")
        if types is None:
            pattern = next((hf[k] for k in pattern_keys if hf.get(k) is not None), default_pattern)
            if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
                return {}, f"config.json field sliding_window_pattern={describe(pattern)} is not a positive integer"
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        problem = layer_types_problem(types, layers)
        if problem:
            return {}, problem
        window = hf["sliding_window"] if "sliding_window" in hf else DEFAULT_WINDOW
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            return {}, (f"config.json field sliding_window={describe(window)} is not supported with "
                        f"'sliding_attention' layers; supported: a positive integer")
        return {"sliding_window": window, "layer_types": tuple(types)}, None

    return Derived(("sliding_window", "layer_types", *pattern_keys), read)


def read_gemma3_rope(hf: Mapping[str, Any]) -> Read:
    """Global RoPE (full layers, with its scaling) and the local base of sliding layers (default RoPE).

    transformers >= 5 writes rope_parameters per layer type ({"full_attention": {...}, "sliding_attention": {...}});
    older versions rope_theta (default 1e6) + rope_scaling for the global one and rope_local_base_freq (1e4)."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and ("full_attention" in params or "sliding_attention" in params):
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        if not isinstance(full, Mapping) or not isinstance(local, Mapping):
            return {}, f"config.json field rope_parameters={describe(params)} is not a mapping per layer type"
        local_theta = local.get("rope_theta", 10000.0)
        local_kind = local.get("rope_type", local.get("type", "default")) or "default"
        extra = sorted(k for k in set(local) - {"rope_type", "type", "rope_theta"} if local[k] is not None)
        if local_kind != "default" or extra:
            what = f".rope_type={local_kind!r}" if local_kind != "default" else f".{extra[0]}={local[extra[0]]!r}"
            return {}, (f"config.json field rope_parameters.sliding_attention{what} is not supported; supported: "
                        f"rope_type 'default' with rope_theta (scaling applies to full-attention layers only)")
        flat = {"rope_parameters": {"rope_theta": 1e6, **full}}
    else:
        local_theta = hf.get("rope_local_base_freq", 10000.0)
        flat = {"rope_scaling": hf.get("rope_scaling"), "rope_theta": hf.get("rope_theta", 1e6)}
    fields, problem = read_rope(flat)
    if problem:  # name the field as config.json has it
        return {}, problem.replace("field rope_parameters", "field rope_parameters.full_attention", 1)
    try:
        return {**fields, "rope_local_theta": float(local_theta)}, None
    except (TypeError, ValueError):
        return {}, f"config.json field rope_local_base_freq={describe(local_theta)} is not a number"


def _common_without(*keys: str) -> tuple[Rule, ...]:
    """COMMON's rules except those reading `keys` (Gemma reads them its own way)."""
    return tuple(r for r in COMMON if not set(r.keys) & set(keys))


_GEMMA: tuple[Rule, ...] = (
    Choice("hidden_activation", "hidden_act", HIDDEN_ACT, "gelu_pytorch_tanh"),
    Ignored(("hidden_act",), "transformers' Gemma computes hidden_activation"),
    Derived(("attention_bias",), read_attention_bias_qkvo),
    Copy("query_pre_attn_scalar", "query_pre_attn_scalar", float, 256.0),
    Refused("use_bidirectional_attention", (False,), "bidirectional attention"),
    Ignored(("cache_implementation",), "generation default (transformers' hybrid cache); decodekit's cache is "
                                       "the static max_seq one"),
)

GEMMA2: tuple[Rule, ...] = _common_without("hidden_act") + _GEMMA + (
    _softcap("attn_logit_softcapping", "attn_softcap", 50.0),
    _softcap("final_logit_softcapping", "final_softcap", 30.0),
    _window((), GEMMA2_WINDOW_PATTERN),
)
GEMMA3: tuple[Rule, ...] = _common_without("hidden_act", "rope_parameters") + _GEMMA + (
    Derived(("rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq"), read_gemma3_rope),
    Ignored(("attn_logit_softcapping",), "transformers' Gemma 3 attention does not apply it"),
    _softcap("final_logit_softcapping", "final_softcap", None),
    _window(("sliding_window_pattern", "_sliding_window_pattern"), GEMMA3_WINDOW_PATTERN),
)
