"""Model configuration: one frozen dataclass, named presets, and the Hugging Face config.json mapping.

Families are a registry (``FAMILIES``), never an if/elif on architecture strings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import config_fields as cf
from . import config_phi3 as phi3
from . import config_gemma as gemma


from ..errors import ConfigError  # noqa: F401 - re-exported (the home of every user error is errors.py)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: transformers' rope_type and the parameters it reads (export/rope_fields.ROPE_TYPES).

    kind: default | linear | dynamic | llama3 | yarn | longrope; the tables are computed by export/rope.py.
    factor None (longrope: absent) means max_position_embeddings / original_max_position_embeddings, as in
    transformers; attention_factor None: the kind's own default (yarn: from factor / mscale / mscale_all_dim;
    longrope: from factor and original_max_position_embeddings); beta_fast / beta_slow None: 32 / 1 (yarn).
    """

    kind: str = "default"
    factor: float | None = None  # linear, dynamic, llama3, yarn, longrope
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3, yarn, longrope
    attention_factor: float | None = None  # yarn, longrope: cos and sin are multiplied by it
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool | None = True  # yarn: floor/ceil the correction range (None, as transformers reads it: no)
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors up to original_max_position_embeddings
    long_factor: tuple[float, ...] = ()  # longrope: beyond it

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise ConfigError(f"unsupported RoPE scaling {self.kind!r}; supported: {', '.join(ROPE_KINDS)}")
        object.__setattr__(self, "short_factor", tuple(self.short_factor))  # lists from a manifest's JSON
        object.__setattr__(self, "long_factor", tuple(self.long_factor))


ROPE_KINDS = tuple(cf.ROPE_TYPES)
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")  # what the FFN gate computes (the keys of export/ops.ACTIVATIONS)
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names of the per-layer attention kinds


@dataclass(frozen=True)
class Family:
    """What distinguishes one Hugging Face decoder family from another.

    fields: every config.json field the family understands (``config_fields``); attention_bias / qk_norm /
    embed_scale / sandwich_norm: what the family's architecture always has, whatever its config.json says;
    norm_offset: the checkpoint stores each RMSNorm scale minus this (Gemma: 1, its norms scale by 1 + weight);
    fused_projections: its checkpoints store q/k/v as one self_attn.qkv_proj and gate/up as one mlp.gate_up_proj
    (split at load).
    """

    name: str
    hf_architectures: tuple[str, ...]
    fields: tuple[cf.Rule, ...]
    attention_bias: bool = False
    qk_norm: bool = False
    fused_projections: bool = False
    embed_scale: bool = False
    sandwich_norm: bool = False
    norm_offset: float = 0.0

    def arch_fields(self) -> dict[str, Any]:
        """The ModelConfig fields the architecture fixes."""
        return {"attention_bias": self.attention_bias, "qk_norm": self.qk_norm, "embed_scale": self.embed_scale,
                "sandwich_norm": self.sandwich_norm}


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("LlamaForCausalLM",), cf.LLAMA),
        Family("mistral", ("MistralForCausalLM",), cf.MISTRAL),
        Family("qwen2", ("Qwen2ForCausalLM",), cf.QWEN2, attention_bias=True),
        Family("qwen3", ("Qwen3ForCausalLM",), cf.QWEN3, qk_norm=True),
        Family("phi3", ("Phi3ForCausalLM",), phi3.PHI3, fused_projections=True),
        Family("gemma2", ("Gemma2ForCausalLM",), gemma.GEMMA2, embed_scale=True, sandwich_norm=True, norm_offset=1.0),
        Family("gemma3_text", ("Gemma3ForCausalLM",), gemma.GEMMA3, qk_norm=True, embed_scale=True,
               sandwich_norm=True, norm_offset=1.0),
    )
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family pre-norm decoder."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    partial_rotary_factor: float = 1.0  # rotary embedding on the first int(head_dim * this) dims of each head
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    o_bias: bool = False  # o_proj bias (added once after the attention all-reduce)
    mlp_bias: bool = False  # gate/up/down biases (down's added once after the FFN all-reduce)
    hidden_act: str = "silu"  # one of ACTIVATIONS: act(gate) * up
    # sliding-window attention: query i sees keys j with i - W < j <= i on "sliding_attention" layers
    # (layer_types; empty: every layer is sliding when sliding_window is set, as Mistral)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None  # Gemma 3: RoPE base of sliding layers (default scaling); None: one RoPE
    # Gemma 2/3 numerics (export/model.py)
    embed_scale: bool = False  # embeddings x sqrt(hidden_size), the factor rounded to the model dtype
    sandwich_norm: bool = False  # RMSNorm on each attention / FFN output before its residual add
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (None: head_dim ** -0.5)
    attn_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap) before the mask
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"unsupported model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embedding, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.layer_types and (len(self.layer_types) != self.num_layers
                                 or not set(self.layer_types) <= set(LAYER_TYPES)):
            raise ConfigError(f"layer_types must list {self.num_layers} entries of {', '.join(LAYER_TYPES)}")
        self._check_rotary()

    def _check_rotary(self) -> None:
        r, s = self.rotary_dim, self.rope_scaling
        if r < 2 or r % 2:
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor} gives a rotary dimension of {r} "
                              f"(head_dim {self.head_dim}); it must be a positive even number")
        for name in ("short_factor", "long_factor") if s.kind == "longrope" else ():
            if len(getattr(s, name)) != r // 2:
                raise ConfigError(f"config.json field rope_parameters.{name} has {len(getattr(s, name))} values; "
                                  f"the rotary dimension {r} needs {r // 2}")

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` is a "sliding_attention" layer (its window and local RoPE apply)."""
        if self.layer_types:
            return self.layer_types[layer] == "sliding_attention"
        return self.sliding_window is not None

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s sliding window W (query i sees keys i - W < j <= i), None for full attention."""
        return self.sliding_window if self.is_sliding(layer) else None

    def local_rope(self, layer: int) -> bool:
        """Whether layer `layer` rotates with the local RoPE tables (rope_local_theta) instead of the global ones."""
        return self.rope_local_theta is not None and self.is_sliding(layer)

    def layer_kind(self, layer: int, max_seq: int) -> tuple[int | None, bool]:
        """What distinguishes layer `layer`'s graph from another's at cache length max_seq: (window, local RoPE);
        a window >= max_seq masks nothing and counts as full attention."""
        w = self.window(layer)
        return (w if w is not None and w < max_seq else None), self.local_rope(layer)

    def select_layers(self, layers: list[int]) -> "ModelConfig":
        """This config with only the given layers (in that order): templates and one-layer shape holders."""
        types = tuple(self.layer_types[i] for i in layers) if self.layer_types else ()
        return dataclasses.replace(self, num_layers=len(layers), layer_types=types)

    def check_max_seq(self, max_seq: int) -> None:
        """Refuse a cache length this config's attention would not compute exactly."""
        beyond = cf.ROPE_TYPES[self.rope_scaling.kind].beyond_max_positions  # dynamic NTK: the table of max_seq
        if max_seq > self.max_position_embeddings and not beyond:
            raise ConfigError(f"--max-seq {max_seq} exceeds the model's max_position_embeddings "
                              f"{self.max_position_embeddings}")

    @property
    def rotary_dim(self) -> int:
        """How many leading dimensions of each head the rotary embedding rotates (transformers' int(...))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        attn += (self.q_size + 2 * self.kv_size) if self.attention_bias else 0
        attn += h if self.o_bias else 0
        attn += 2 * self.head_dim if self.qk_norm else 0
        layer = attn + 3 * h * i + (4 if self.sandwich_norm else 2) * h + ((2 * i + h) if self.mlp_bias else 0)
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + h

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["layer_types"] = tuple(d.get("layer_types", ()))
        return cls(**d)


def _preset(family: str, **kw: Any) -> ModelConfig:
    for key, value in FAMILIES[family].arch_fields().items():
        kw.setdefault(key, value)
    return ModelConfig(family=family, **kw)


PRESETS: dict[str, ModelConfig] = {
    # The embedded default and test model: exports in seconds.
    "tiny": _preset("llama", vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_ids=(2,)),
    # ~156M-parameter Llama shape used by the CPU benchmarks.
    "llama-156m": _preset("llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=8,
                          num_heads=16, num_kv_heads=4, head_dim=64, max_position_embeddings=2048,
                          bos_token_id=1, eos_token_ids=(2,)),
    "llama-3.2-1b": _preset("llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                            num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                            rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
                            tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "qwen2.5-0.5b": _preset("qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                            num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
                            max_position_embeddings=32768, tie_word_embeddings=True, eos_token_ids=(151643, 151645)),
    "llama-3.1-8b": _preset("llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                            num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                            rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
                            bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    # llama-3.1-70b widths with 8 layers: a model that does not fit one GPU comfortably at full depth.
    "llama-3.1-70b-8l": _preset("llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=8,
                                num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                                rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                                max_position_embeddings=131072, bos_token_id=128000, eos_token_ids=(128001,)),
}


def preset(name: str) -> ModelConfig:
    """A named preset; unknown names fail loudly with the list of known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def family_of(hf: Mapping[str, Any]) -> Family:
    archs = tuple(hf.get("architectures") or ())
    for fam in FAMILIES.values():
        if hf.get("model_type") == fam.name or set(archs) & set(fam.hf_architectures):
            return fam
    supported = ", ".join(a for f in FAMILIES.values() for a in f.hf_architectures)
    raise ConfigError(f"unsupported architecture {archs or hf.get('model_type')!r}; decodekit supports {supported}")


@dataclass(frozen=True)
class Accounting:
    """A config.json accounted for: the ModelConfig it maps to, and the fields that did not map."""

    config: ModelConfig
    ignored: tuple[str, ...]  # declared by the family as not changing inference math
    unknown: tuple[str, ...]  # declared by no rule: transformers' config class does not define them either

    def to_dict(self) -> dict[str, list[str]]:
        return {"ignored": list(self.ignored), "unknown": list(self.unknown)}


def account(hf: Mapping[str, Any]) -> Accounting:
    """Walk config.json with the family's field rules; the first unsupported value is refused in one line."""
    fam = family_of(hf)
    kw: dict[str, Any] = {"family": fam.name, **fam.arch_fields()}
    ignored: list[str] = []
    for rule in fam.fields:
        problem = rule.problem(hf)
        if problem:
            raise ConfigError(f"{problem} (decodekit's {fam.name} family)")
        kw.update(rule.read(hf))
        if isinstance(rule, cf.Ignored):
            ignored += [k for k in rule.keys if k in hf]
    declared = {k for rule in fam.fields for k in rule.keys}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
        if key not in kw:
            raise ConfigError(f"config.json lacks the field {'num_hidden_layers' if key == 'num_layers' else key}")
    return Accounting(ModelConfig.from_dict(kw), tuple(sorted(ignored)), tuple(sorted(set(hf) - declared)))


def from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
    """Map a Hugging Face config.json dict to a ModelConfig (see ``account``)."""
    return account(hf).config


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json; pass a Hugging Face model folder or preset:NAME")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: unreadable JSON ({e.msg}); pass a Hugging Face model folder") from None


def load_hf_config(folder: Path) -> ModelConfig:
    return account(read_hf_config(folder)).config
