"""Shared benchmark helpers: medians, memory-bandwidth ceilings measured in the same run, roofline bytes.

Speed is measured here and in `decodekit bench` / tools/bench_*.py, never asserted in tests.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

from ..dtypes import precision
from ..export.config import ModelConfig


def dtype_bytes(name: str) -> int:
    return precision(name).itemsize



def median_ms(fn: Callable[[], object], iters: int, warmup: int = 3, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of fn() in ms (sync() after each call, for asynchronous devices)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def weight_bytes(config: ModelConfig, dtype: str, tp: int = 1) -> int:
    """Bytes of weights read per decode step (the embedding row is negligible; a tied LM head is read once)."""
    c = config
    layer = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    params = c.num_layers * layer / tp + c.vocab_size * c.hidden_size
    return int(params * dtype_bytes(dtype))


def artifact_weight_bytes(manifest) -> int:
    """Weight bytes one decode step of this artifact reads (all ranks): weight_bytes() of its config and dtype, with
    the MatMuls a quantize pass replaced counted at their packed size (codes + scales + zero points, per the
    manifest's pass reports)."""
    total = weight_bytes(manifest.config, manifest.dtype)
    for p in manifest.passes:
        if p["name"] == "quantize":
            total += p["counts"]["bytes_after"] - p["counts"]["bytes_before"]
    return total


def kv_bytes(config: ModelConfig, dtype: str, batch: int, kv_len: int, tp: int = 1) -> int:
    """Bytes of K and V read per decode step at a valid length kv_len."""
    kv_heads = max(config.num_kv_heads // tp, 1)
    return 2 * config.num_layers * batch * kv_heads * kv_len * config.head_dim * dtype_bytes(dtype)


def cpu_read_bandwidth(gib: float = 1.0, iters: int = 7) -> float:
    """Bytes/s of a streaming read on all cores: torch's parallel, vectorized sum over a buffer far larger
    than the caches (numpy's single-threaded pairwise sum is compute-bound at about half of this)."""
    import torch

    a = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32)
    ms = median_ms(lambda: a.sum(), iters, warmup=2)
    return a.numel() * 4 / (ms / 1e3)


def gpu_copy_bandwidth(gib: float = 2.0, iters: int = 20) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written (CUDA events)."""
    import torch

    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    src.random_(0, 255)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del src, dst
    return 2 * int(gib * 2**30) / (statistics.median(times) / 1e3)
