"""RoPE fields of config.json as data: which rope_type reads which parameters, and what each family's config does.

transformers reads RoPE from ``rope_parameters`` (>= 5) or ``rope_scaling`` + ``rope_theta`` (older files), and
computes the frequencies with ``modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type]``. ``ROPE_TYPES`` lists, per
rope_type decodekit implements (export/rope.py), the parameter keys that function reads; ``read_rope`` turns them
into ``ModelConfig.rope_scaling`` (a ``RopeScaling``) or refuses the first key it does not understand, by name.

Defaults follow transformers' ``RotaryEmbeddingConfigMixin.standardize_rope_params``: llama3 / yarn / longrope
read ``original_max_position_embeddings`` from the RoPE parameters, else ``max_position_embeddings``; a family
whose config class has a top-level ``original_max_position_embeddings`` field (Phi-3, default 4096) uses that one
instead. ``partial_rotary_factor`` (top level, or inside the RoPE parameters, which wins) is read only by families
whose attention rotates part of each head (``RopeRules.partial_rotary``); elsewhere a value other than 1 is refused
(transformers' Llama / Mistral / Qwen attention rotates whole heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

Read = tuple[dict[str, Any], "str | None"]


@dataclass(frozen=True)
class RopeType:
    """One rope_type: the keys its frequency function reads (besides rope_type / type / rope_theta)."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    original_max: bool = False  # reads original_max_position_embeddings (defaulted as transformers does)
    beyond_max_positions: bool = False  # meant to serve sequences longer than max_position_embeddings

    @property
    def keys(self) -> tuple[str, ...]:
        return self.required + self.optional + (("original_max_position_embeddings",) if self.original_max else ())


ROPE_TYPES: dict[str, RopeType] = {
    "default": RopeType(()),
    "linear": RopeType(("factor",)),
    # NTK scaling from the running length: frequencies are those of max_position_embeddings up to it (export/rope.py)
    "dynamic": RopeType(("factor",), beyond_max_positions=True),
    "llama3": RopeType(("factor", "low_freq_factor", "high_freq_factor"), original_max=True),
    "yarn": RopeType(("factor",), ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                                   "truncate"), original_max=True),
    "longrope": RopeType(("short_factor", "long_factor"), ("factor", "attention_factor"), original_max=True),
}
_BOOKKEEPING = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
_INT_KEYS = ("original_max_position_embeddings",)
_BOOL_KEYS = ("truncate",)
_LIST_KEYS = ("short_factor", "long_factor")


@dataclass(frozen=True)
class RopeRules:
    """What one family's transformers config does with the RoPE fields.

    types: the rope_types its config accepts; aliases: older names it reads as another type (Phi-3: su, yarn ->
    longrope); original_max_field: its config class's default for a top-level original_max_position_embeddings
    field, which then wins over the RoPE parameters' (None: no such field); partial_rotary: its attention rotates
    only the first int(head_dim * partial_rotary_factor) dimensions of each head."""

    types: tuple[str, ...] = tuple(ROPE_TYPES)
    aliases: Mapping[str, str] = field(default_factory=dict)
    original_max_field: int | None = None
    partial_rotary: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        """The config.json keys a family with these rules reads."""
        return ("rope_parameters", "rope_scaling", "rope_theta") + \
            (("partial_rotary_factor",) if self.partial_rotary else ()) + \
            (("original_max_position_embeddings",) if self.original_max_field is not None else ())


LLAMA_ROPE = RopeRules()


def read_rope(hf: Mapping[str, Any], rules: RopeRules = LLAMA_ROPE) -> Read:
    """rope_theta, rope_scaling (RopeScaling fields) and, for partial-rotary families, partial_rotary_factor."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key) or {}
    if not isinstance(params, Mapping):
        return {}, f"config.json field {key}={_describe(params)} is not a mapping"
    written = params.get("rope_type", params.get("type", "default")) or "default"
    kind = rules.aliases.get(written, written)
    if kind not in rules.types:
        supported = [*rules.types, *rules.aliases]
        return {}, (f"config.json field {key}.rope_type={written!r} is not supported; "
                    f"supported: {', '.join(map(repr, supported))}")
    rope = ROPE_TYPES[kind]
    extra = [k for k in sorted(set(params) - set(rope.keys) - set(_BOOKKEEPING)) if params[k] is not None]
    if extra:
        return {}, (f"config.json field {key}.{extra[0]}={_describe(params[extra[0]])} is not supported with "
                    f"rope_type {kind!r}; supported keys: {', '.join(rope.keys + _BOOKKEEPING)}")
    missing = [k for k in rope.required if params.get(k) is None]
    if missing:
        return {}, f"config.json field {key} (rope_type {written!r}) lacks {', '.join(missing)}"
    try:
        scaling = {"kind": kind, **{k: None if params[k] is None else _value(k, params[k])
                                    for k in rope.required + rope.optional if k in params}}
        if rope.original_max:
            scaling["original_max_position_embeddings"] = _original_max(hf, params, written, rules)
        partial, problem = _partial_rotary(hf, params, key, rules)
    except (TypeError, ValueError) as e:
        return {}, f"config.json field {key}: {e}"
    if problem:
        return {}, problem
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    return {"rope_theta": theta, "rope_scaling": scaling, **partial}, None


def _value(key: str, value: Any) -> Any:
    if key in _LIST_KEYS:
        if not isinstance(value, list) or not all(isinstance(x, (int, float)) for x in value):
            raise ValueError(f"{key}={_describe(value)} is not a list of numbers")
        return tuple(float(x) for x in value)
    if key in _BOOL_KEYS:
        return bool(value)
    return int(value) if key in _INT_KEYS else float(value)


def _original_max(hf: Mapping[str, Any], params: Mapping[str, Any], written: str, rules: RopeRules) -> int:
    """transformers' standardize_rope_params: for llama3 / yarn / longrope (as written), a config class with a
    top-level original_max_position_embeddings field uses it; otherwise the RoPE parameters' value, else
    max_position_embeddings (an alias such as Phi-3's "su" keeps its parameters' value)."""
    if rules.original_max_field is not None and written in ("llama3", "yarn", "longrope"):
        return int(hf.get("original_max_position_embeddings") or rules.original_max_field)
    value = params.get("original_max_position_embeddings")
    if value is None and written in ROPE_TYPES:
        value = hf.get("max_position_embeddings") or 4096
    if value is None:
        raise ValueError(f"rope_type {written!r} needs original_max_position_embeddings in its parameters")
    return int(value)


def _partial_rotary(hf: Mapping[str, Any], params: Mapping[str, Any], key: str, rules: RopeRules) -> Read:
    inner = params.get("partial_rotary_factor")
    value = inner if inner is not None else hf.get("partial_rotary_factor")
    if rules.partial_rotary:
        factor = 1.0 if value is None else float(value)
        if not 0.0 < factor <= 1.0:
            return {}, f"config.json field partial_rotary_factor={factor!r} is not in (0, 1]"
        return {"partial_rotary_factor": factor}, None
    if inner is not None and inner not in (1, 1.0):
        return {}, (f"config.json field {key}.partial_rotary_factor={_describe(inner)} is not supported (this "
                    f"family's attention rotates whole heads); supported: 1 or absent")
    return {}, None


def _describe(value: Any) -> str:
    from .config_fields import describe

    return describe(value)
