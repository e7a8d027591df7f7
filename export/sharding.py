"""Tensor parallelism as a transform on a loaded Decoder (Megatron style, gpt-fast's approach).

Rank r of N keeps: q/k/v and gate/up column slices (by head / by FFN row), o_proj and down_proj row
slices. Each row-parallel output then needs one all-reduce, which the model's AllReduceResidualNorm
steps perform through the ReduceGroup installed here. Embedding, norms and LM head are replicated.
KV heads are replicated when num_kv_heads < N (N must be a multiple of num_kv_heads).
Column-parallel biases (q/k/v, gate/up) are sliced with their rows; the row-parallel biases (o_proj,
down_proj) live in the AllReduceResidualNorm after the projection, replicated, and are added once after the sum.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from . import ops
from .config import ConfigError, ModelConfig
from .model import Attention, Decoder, FeedForward


def check_tp(config: ModelConfig, world: int) -> None:
    c = config
    if world < 1:
        raise ConfigError(f"tp must be >= 1, got {world}")
    if c.num_heads % world:
        raise ConfigError(f"tp={world} does not divide num_heads={c.num_heads}; choose a tp that divides it")
    if c.intermediate_size % world:
        raise ConfigError(f"tp={world} does not divide intermediate_size={c.intermediate_size}")
    if c.num_kv_heads % world and world % c.num_kv_heads:
        raise ConfigError(f"tp={world} and num_kv_heads={c.num_kv_heads}: one must divide the other")


def _slice_rows(lin: nn.Linear, start: int, size: int) -> None:
    """Keep output features [start, start+size) (column parallel)."""
    lin.weight = nn.Parameter(lin.weight.data[start:start + size].clone())
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data[start:start + size].clone())
    lin.out_features = size


def _slice_cols(lin: nn.Linear, start: int, size: int) -> None:
    """Keep input features [start, start+size) (row parallel)."""
    lin.weight = nn.Parameter(lin.weight.data[:, start:start + size].clone())
    lin.in_features = size


def _shard_attention(a: Attention, rank: int, world: int) -> None:
    D, heads = a.head_dim, a.num_heads // world
    kv_heads = max(a.num_kv_heads // world, 1)
    kv_start = rank * a.num_kv_heads // world  # with replication: rank // (world // num_kv_heads)
    _slice_rows(a.q_proj, rank * heads * D, heads * D)
    _slice_rows(a.k_proj, kv_start * D, kv_heads * D)
    _slice_rows(a.v_proj, kv_start * D, kv_heads * D)
    _slice_cols(a.o_proj, rank * heads * D, heads * D)
    a.num_heads, a.num_kv_heads = heads, kv_heads


def _shard_ffn(f: FeedForward, rank: int, world: int) -> None:
    size = f.gate_proj.out_features // world
    _slice_rows(f.gate_proj, rank * size, size)
    _slice_rows(f.up_proj, rank * size, size)
    _slice_cols(f.down_proj, rank * size, size)


def shard(model: Decoder, rank: int, world: int, group: ops.ReduceGroup | None = None) -> Decoder:
    """Turn a full model into rank `rank` of `world` in place and install `group` for the all-reduces."""
    check_tp(model.config, world)
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is outside tp={world}")
    with torch.no_grad():
        for layer in model.layers:
            _shard_attention(layer.attn, rank, world)
            _shard_ffn(layer.ffn, rank, world)
    model.set_group(group if group is not None else SizeOnlyGroup(world))
    model.tp_rank, model.tp_size = rank, world
    return model


class SizeOnlyGroup(ops.ReduceGroup):
    """A group that only knows its size: enough to trace DistCollective nodes at export."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model was sharded for export only; run it under a real ReduceGroup")


class ThreadGroup:
    """In-process tensor parallelism: N ranks run in N threads and sum partials at each all-reduce."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size)
        self._slots: list[torch.Tensor | None] = [None] * world_size

    def rank(self, r: int) -> "_ThreadRank":
        return _ThreadRank(self, r)


class _ThreadRank(ops.ReduceGroup):
    def __init__(self, shared: ThreadGroup, rank: int) -> None:
        self.shared, self.rank, self.world_size = shared, rank, shared.world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shared
        s._slots[self.rank] = x
        s._barrier.wait()
        total = torch.stack([t for t in s._slots]).sum(0)  # same order on every rank: identical results
        s._barrier.wait()
        return total
