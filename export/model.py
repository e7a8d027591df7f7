"""The Llama-family decoder in plain PyTorch, with an explicit static KV cache.

    embed -> input_norm -> L x [attn -> attn_norm(all-reduce + residual + RMSNorm) -> ffn -> ffn_norm(...)] -> lm_head

Layer i's ``ffn_norm`` holds layer i+1's input RMSNorm (the final norm for the last layer), so each
"all-reduce + residual add + RMSNorm" step is one module, as TensorRT-LLM fuses it. Layers never take
tensor-parallel arguments: ``export.sharding`` slices a loaded model and installs a ReduceGroup.

Per layer, what differs is data the decoder hands it: the attention mask (causal, or causal within a sliding
window) and the RoPE tables (global, or Gemma 3's local ones). Gemma 2/3 add (config flags): embeddings scaled
by sqrt(hidden), a post-norm on each block output before the residual add (``post_norm``), the query scale
from query_pre_attn_scalar and soft-capped attention scores and logits.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from . import ops
from .config import ModelConfig, RopeScaling
from .rope import cos_sin_tables

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (key_BKTD, value_BKTD)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class AllReduceResidualNorm(nn.Module):
    """all_reduce(partial) [+ bias] + residual, then RMSNorm: returns (normed, new_residual).

    ``reduce_bias`` is the bias of the row-parallel projection before it (o_proj / down_proj, when the config
    has one): added once after the all-reduce, so tensor-parallel ranks never add it N times.
    """

    def __init__(self, dim: int, eps: float, bias: bool = False, post_norm: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.reduce_bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.post_norm = RMSNorm(dim, eps) if post_norm else None  # Gemma: norm of the block output, then the add
        self.eps = eps
        self.group: ops.ReduceGroup | None = None

    def forward(self, partial_BSH: torch.Tensor, residual_BSH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reduced_BSH = ops.all_reduce(partial_BSH, self.group)
        if self.reduce_bias is not None:
            reduced_BSH = reduced_BSH + self.reduce_bias
        if self.post_norm is not None:
            reduced_BSH = self.post_norm(reduced_BSH)
        residual_BSH = reduced_BSH + residual_BSH
        return ops.rms_norm(residual_BSH, self.weight, self.eps), residual_BSH


class Attention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.q_size, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.kv_size, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.kv_size, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.q_size, c.hidden_size, bias=False)  # its bias (c.o_bias) is in attn_norm
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        self.softcap = c.attn_softcap or 0.0

    def _heads(self, x_BSX: torch.Tensor, heads: int, norm: RMSNorm | None) -> torch.Tensor:
        B, S = x_BSX.shape[:2]
        x_BSHD = x_BSX.view(B, S, heads, self.head_dim)
        if norm is not None:
            x_BSHD = norm(x_BSHD)
        return x_BSHD.transpose(1, 2)

    def forward(self, x_BSH: torch.Tensor, rope: "Rope", write_B: torch.Tensor, nonpad_B: torch.Tensor,
                mask_B1ST: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        q_BHSD = rope(self._heads(self.q_proj(x_BSH), self.num_heads, self.q_norm))
        k_BKSD = rope(self._heads(self.k_proj(x_BSH), self.num_kv_heads, self.k_norm))
        v_BKSD = self._heads(self.v_proj(x_BSH), self.num_kv_heads, None)
        k_present = ops.cache_update(k_cache, k_BKSD, write_B)
        v_present = ops.cache_update(v_cache, v_BKSD, write_B)
        o_BHSD = ops.attention(q_BHSD, k_present, v_present, mask_B1ST, nonpad_B, self.scale, self.softcap)
        B, _, S, _ = o_BHSD.shape
        return self.o_proj(o_BHSD.transpose(1, 2).reshape(B, S, -1)), k_present, v_present


class FeedForward(nn.Module):
    """down(act(gate(x)) * up(x)); down_proj's bias (c.mlp_bias) lives in the following ffn_norm."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act = ops.ACTIVATIONS[c.hidden_act]

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x_BSH)) * self.up_proj(x_BSH))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.attn = Attention(c)
        self.attn_norm = AllReduceResidualNorm(c.hidden_size, c.rms_norm_eps, bias=c.o_bias, post_norm=c.sandwich_norm)
        self.ffn = FeedForward(c)
        self.ffn_norm = AllReduceResidualNorm(c.hidden_size, c.rms_norm_eps, bias=c.mlp_bias, post_norm=c.sandwich_norm)

    def forward(self, normed, residual, rope, write_B, nonpad_B, mask_B1ST, k_cache, v_cache):
        partial, k_present, v_present = self.attn(normed, rope, write_B, nonpad_B, mask_B1ST, k_cache, v_cache)
        normed, residual = self.attn_norm(partial, residual)
        normed, residual = self.ffn_norm(self.ffn(normed), residual)
        return normed, residual, k_present, v_present


class Rope(nn.Module):
    """Rotary embedding bound to one step's positions (tables are buffers of the decoder)."""

    def __init__(self, cos_PD2: torch.Tensor, sin_PD2: torch.Tensor, pos_BS: torch.Tensor) -> None:
        super().__init__()
        self.cos_PD2, self.sin_PD2, self.pos_BS = cos_PD2, sin_PD2, pos_BS

    def forward(self, x_BHSD: torch.Tensor) -> torch.Tensor:
        return ops.rotary(x_BHSD, self.cos_PD2, self.sin_PD2, self.pos_BS)


def attention_masks(position_ids_BS: torch.Tensor, T: int, windows: set[int | None]
                    ) -> dict[int | None, torch.Tensor]:
    """Boolean masks [B, 1, S, T] (True = attend) over cache rows 0..T-1, by query position p = position_ids:
    None -> causal (row <= p); W -> causal within the window (p - W < row <= p, transformers' sliding window:
    W keys, the query's own included)."""
    kv_pos_111T = torch.arange(T, device=position_ids_BS.device)[None, None, None, :]
    pos_B1S1 = position_ids_BS[:, None, :, None]
    causal_B1ST = kv_pos_111T <= pos_B1S1
    masks = {None: causal_B1ST}
    for w in sorted(w for w in windows if w is not None):
        masks[w] = causal_B1ST & (kv_pos_111T > pos_B1S1 - w)
    return masks


class Decoder(nn.Module):
    """One forward serves prefill (S > 1) and decode (S = 1); caches are updated in place."""

    def __init__(self, config: ModelConfig, rope_positions: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.static_kv = False  # True: fixed shapes and no host sync per step (torch.compile / CUDA graphs)
        self.rope_positions = rope_positions or min(config.max_position_embeddings, 8192)
        self.reset_rope_tables()

    def reset_rope_tables(self) -> None:
        """(Re)compute the fp32 RoPE tables: rope_cos/sin, and rope_local_cos/sin for Gemma 3's sliding layers."""
        c = self.config
        tables = {"rope": cos_sin_tables(c, self.rope_positions)}
        if c.rope_local_theta is not None:
            local = dataclasses.replace(c, rope_theta=c.rope_local_theta, rope_scaling=RopeScaling())
            tables["rope_local"] = cos_sin_tables(local, self.rope_positions)
        for name, (cos, sin) in tables.items():
            self.register_buffer(f"{name}_cos", cos, persistent=False)
            self.register_buffer(f"{name}_sin", sin, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def set_group(self, group: ops.ReduceGroup | None) -> None:
        for layer in self.layers:
            layer.attn_norm.group = layer.ffn_norm.group = group

    def forward(self, input_ids_BS: torch.Tensor, position_ids_BS: torch.Tensor, write_indices_B: torch.Tensor,
                nonpad_kv_seqlen_B: torch.Tensor, cache: KVCache,
                logits: Literal["all", "last"] = "all") -> tuple[torch.Tensor, KVCache]:
        # eager: attend over the valid prefix only (one host sync); traced / compiled: the whole static cache
        static = ops.exporting() or self.static_kv
        T = cache[0][0].shape[2] if static else int(nonpad_kv_seqlen_B.max())
        c = self.config
        kinds = [c.layer_kind(i, T) for i in range(len(self.layers))]
        masks = attention_masks(position_ids_BS, T, {w for w, _ in kinds})
        ropes = {local: Rope(getattr(self, f"{name}_cos").to(self.dtype), getattr(self, f"{name}_sin").to(self.dtype),
                             position_ids_BS)
                 for local, name in ((False, "rope"), (True, "rope_local")) if local in {r for _, r in kinds}}
        residual = self.embed(input_ids_BS)
        if c.embed_scale:  # transformers rounds the factor to the model dtype first
            residual = residual * torch.tensor(c.hidden_size ** 0.5, dtype=residual.dtype)
        normed = self.input_norm(residual)
        present: KVCache = []
        for layer, (k_cache, v_cache), (window, local) in zip(self.layers, cache, kinds):
            normed, residual, k, v = layer(normed, residual, ropes[local], write_indices_B, nonpad_kv_seqlen_B,
                                           masks[window], k_cache, v_cache)
            present.append((k, v))
        if logits == "last":
            last_B = (nonpad_kv_seqlen_B - write_indices_B - 1).clamp(min=0)
            normed = torch.gather(normed, 1, last_B[:, None, None].expand(-1, 1, normed.shape[-1]))
        logits_BSV = self.lm_head(normed)
        return (ops.soft_cap(logits_BSV, c.final_softcap) if c.final_softcap else logits_BSV), present

    def new_cache(self, batch: int, max_seq: int, device: torch.device | str = "cpu") -> KVCache:
        """Zeroed static caches [batch, kv_heads_local, max_seq, head_dim] per layer."""
        a = self.layers[0].attn
        shape = (batch, a.num_kv_heads, max_seq, a.head_dim)
        return [(torch.zeros(shape, dtype=self.dtype, device=device), torch.zeros(shape, dtype=self.dtype, device=device))
                for _ in self.layers]
