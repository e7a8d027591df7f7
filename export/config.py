"""Model configuration: one frozen dataclass, named presets, and the Hugging Face config.json mapping.

Families are a registry (``FAMILIES``), never an if/elif on architecture strings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ..errors import ConfigError  # noqa: F401 - re-exported (the home of every user error is errors.py)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: default | linear | llama3."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise ConfigError(f"unsupported RoPE scaling {self.kind!r}; supported: {', '.join(ROPE_KINDS)}")


ROPE_KINDS = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Family:
    """What distinguishes one Hugging Face decoder family from another."""

    name: str
    hf_architectures: tuple[str, ...]
    attention_bias: bool = False
    qk_norm: bool = False


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("LlamaForCausalLM",)),
        Family("mistral", ("MistralForCausalLM",)),
        Family("qwen2", ("Qwen2ForCausalLM",), attention_bias=True),
        Family("qwen3", ("Qwen3ForCausalLM",), qk_norm=True),
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
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"unsupported model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embedding, got {self.head_dim}")

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
        attn += 2 * self.head_dim if self.qk_norm else 0
        layer = attn + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + h

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


def _preset(family: str, **kw: Any) -> ModelConfig:
    fam = FAMILIES[family]
    kw.setdefault("attention_bias", fam.attention_bias)
    kw.setdefault("qk_norm", fam.qk_norm)
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


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    # transformers >= 5 writes rope_parameters; older versions rope_theta + rope_scaling.
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                                  float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
    raise ConfigError(f"unsupported RoPE scaling {kind!r} in config.json; supported: {', '.join(ROPE_KINDS)}")


def family_of(hf: dict[str, Any]) -> Family:
    archs = tuple(hf.get("architectures") or ())
    for fam in FAMILIES.values():
        if hf.get("model_type") == fam.name or set(archs) & set(fam.hf_architectures):
            return fam
    supported = ", ".join(a for f in FAMILIES.values() for a in f.hf_architectures)
    raise ConfigError(f"unsupported architecture {archs or hf.get('model_type')!r}; decodekit supports {supported}")


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """Map a Hugging Face config.json dict to a ModelConfig."""
    fam = family_of(hf)
    if hf.get("use_sliding_window"):
        raise ConfigError("sliding-window attention (use_sliding_window=true) is not supported; export a full-attention checkpoint")
    theta, scaling = _rope_from_hf(hf)
    heads = int(hf["num_attention_heads"])
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ModelConfig(
        family=fam.name,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", fam.attention_bias)),
        qk_norm=fam.qk_norm,
        bos_token_id=hf.get("bos_token_id") if isinstance(hf.get("bos_token_id"), int) else None,
        eos_token_ids=eos_ids,
    )


def load_hf_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder}: no config.json; pass a Hugging Face model folder or preset:NAME")
    return from_hf_config(json.loads(path.read_text()))
