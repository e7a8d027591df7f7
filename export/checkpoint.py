"""Build a Decoder from a preset (random weights) or a Hugging Face folder (safetensors only, never pickle)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..dtypes import precision
from ..errors import CheckpointError  # noqa: F401 - re-exported
from .config import FAMILIES, Accounting, ConfigError, ModelConfig, account, load_hf_config, preset, read_hf_config
from .gguf import gguf_accounting, gguf_config, is_gguf, load_gguf
from .meta import meta_device
from .model import Decoder


def hf_name_map(config: ModelConfig) -> dict[str, str]:
    """Hugging Face tensor name -> decodekit parameter name."""
    L = config.num_layers
    names = {"model.embed_tokens.weight": "embed.weight", "model.layers.0.input_layernorm.weight": "input_norm.weight",
             "model.norm.weight": f"layers.{L - 1}.ffn_norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    fused = FAMILIES[config.family].fused_projections  # those tensors are in fused_tensors instead
    attn = ["o_proj.weight"] + ([] if fused else ["q_proj.weight", "k_proj.weight", "v_proj.weight"])
    attn += ["q_proj.bias", "k_proj.bias", "v_proj.bias"] if config.attention_bias else []
    attn += ["q_norm.weight", "k_norm.weight"] if config.qk_norm else []
    kinds = ("weight", "bias") if config.mlp_bias else ("weight",)
    mlp = [] if fused else [f"{n}.{k}" for n in ("gate_proj", "up_proj") for k in kinds]
    for i in range(L):
        hf, me = f"model.layers.{i}", f"layers.{i}"
        names.update({f"{hf}.self_attn.{n}": f"{me}.attn.{n}" for n in attn})
        names.update({f"{hf}.mlp.{n}": f"{me}.ffn.{n}" for n in mlp + ["down_proj.weight"]})
        # row-parallel biases are added after the all-reduce, by the norm step that follows
        if config.o_bias:
            names[f"{hf}.self_attn.o_proj.bias"] = f"{me}.attn_norm.reduce_bias"
        if config.mlp_bias:
            names[f"{hf}.mlp.down_proj.bias"] = f"{me}.ffn_norm.reduce_bias"
        if config.sandwich_norm:  # Gemma: post-attention / post-FFN norms, then the pre-FFN norm
            names[f"{hf}.post_attention_layernorm.weight"] = f"{me}.attn_norm.post_norm.weight"
            names[f"{hf}.pre_feedforward_layernorm.weight"] = f"{me}.attn_norm.weight"
            names[f"{hf}.post_feedforward_layernorm.weight"] = f"{me}.ffn_norm.post_norm.weight"
        else:
            names[f"{hf}.post_attention_layernorm.weight"] = f"{me}.attn_norm.weight"
        if i + 1 < L:
            names[f"model.layers.{i + 1}.input_layernorm.weight"] = f"{me}.ffn_norm.weight"
    return names


@dataclass(frozen=True)
class FusedTensor:
    """A Hugging Face tensor holding several decodekit parameters stacked along its rows (dim 0), in order."""

    parts: tuple[tuple[str, int], ...]  # (decodekit parameter, rows)

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.parts)

    def rows_of(self, param: str) -> slice:
        start = 0
        for name, n in self.parts:
            if name == param:
                return slice(start, start + n)
            start += n
        raise KeyError(param)


def fused_tensors(config: ModelConfig) -> dict[str, FusedTensor]:
    """Hugging Face name -> FusedTensor, for families that store q/k/v and gate/up fused (Phi-3: qkv_proj holds
    q, k, v rows; gate_up_proj holds gate then up rows, as its MLP's chunk(2) reads them)."""
    if not FAMILIES[config.family].fused_projections:
        return {}
    if config.attention_bias or config.mlp_bias:
        raise ConfigError(f"{config.family}: biases on fused q/k/v or gate/up projections are not supported")
    c = config
    fused = {}
    for i in range(c.num_layers):
        hf, me = f"model.layers.{i}", f"layers.{i}"
        fused[f"{hf}.self_attn.qkv_proj.weight"] = FusedTensor(
            ((f"{me}.attn.q_proj.weight", c.q_size), (f"{me}.attn.k_proj.weight", c.kv_size),
             (f"{me}.attn.v_proj.weight", c.kv_size)))
        fused[f"{hf}.mlp.gate_up_proj.weight"] = FusedTensor(
            ((f"{me}.ffn.gate_proj.weight", c.intermediate_size), (f"{me}.ffn.up_proj.weight", c.intermediate_size)))
    return fused


def from_checkpoint(config: ModelConfig, param: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A checkpoint tensor as decodekit parameter `param` in `dtype`: RMSNorm scales stored minus the family's
    norm_offset (Gemma: 1 + weight) get it added back, in fp32 before rounding to `dtype`."""
    offset = FAMILIES[config.family].norm_offset
    if offset and param.endswith("norm.weight"):
        t = t.float() + offset
    return t.to(dtype)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are refused; convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{folder}: no *.safetensors weights{hint}")
    return files


def load_hf(folder: str | Path, dtype: str = "fp32", rope_positions: int | None = None) -> Decoder:
    """Load a Hugging Face folder of a supported family into a Decoder (through the exporter's tensor reader)."""
    from .weights import SafetensorsWeights

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; pass a Hugging Face model folder or preset:NAME")
    config = load_hf_config(folder)
    source = SafetensorsWeights(folder, config, dtype)
    model = _empty(config, dtype, rope_positions)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(source.get(name))
    return model.eval()


def _empty(config: ModelConfig, dtype: str, rope_positions: int | None) -> Decoder:
    with meta_device():
        model = Decoder(config, rope_positions)
    model = model.to_empty(device="cpu").to(precision(dtype).torch)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.reset_rope_tables()
    return model


def random_model(config: ModelConfig, dtype: str = "fp32", seed: int = 0, rope_positions: int | None = None) -> Decoder:
    """Random weights (normal, std 0.02; norms around 1) for presets and benchmarks."""
    model = _empty(config, dtype, rope_positions)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in random_parameters(config, dtype, seed):
            params[name].copy_(t)
    return model.eval()


def random_parameters(config: ModelConfig, dtype: str = "fp32", seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """random_model's parameters one at a time, in named_parameters order (the exporter streams them)."""
    with meta_device():
        shapes = [(name, p.shape) for name, p in Decoder(config).named_parameters()]
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes:
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:  # weights and biases
            t = 0.02 * torch.randn(shape, generator=gen)
        yield name, t.to(precision(dtype).torch)


def source_config(source: str) -> ModelConfig:
    """The ModelConfig of SOURCE without loading weights (validates the source early)."""
    if source.startswith("preset:"):
        return preset(source.removeprefix("preset:"))
    if is_gguf(source):
        return gguf_config(source)
    folder = Path(source)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; pass a Hugging Face model folder or preset:NAME")
    return load_hf_config(folder)


def source_accounting(source: str) -> Accounting | None:
    """How SOURCE's config.json (a GGUF's metadata) was accounted for (None for preset:NAME)."""
    if source.startswith("preset:"):
        return None
    if is_gguf(source):
        return gguf_accounting(source)
    return account(read_hf_config(Path(source)))


def load_source(source: str, dtype: str = "fp32", rope_positions: int | None = None, seed: int = 0) -> Decoder:
    """SOURCE is a Hugging Face folder, a GGUF file or preset:NAME."""
    if source.startswith("preset:"):
        return random_model(preset(source.removeprefix("preset:")), dtype, seed, rope_positions)
    if is_gguf(source):
        return load_gguf(source, dtype, rope_positions)
    return load_hf(source, dtype, rope_positions)
