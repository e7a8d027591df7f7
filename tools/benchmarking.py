"""What `decodekit bench` and the studies in benchmarks/ share (one implementation; benchmarks/harness.py builds its
registry of systems on these): shared prompts, the timed decode loop, medians, token comparison, and the roofline:
bytes read per step and memory bandwidth measured in the same run.

Every system a study compares is a runner: ``run(prompts, steps) -> DecodeRun`` (ms to the first token, ms between
successive tokens, the tokens per prompt); ``DecodekitRunner`` is decodekit's, the loop `decodekit generate` runs.
Speed is measured here and in benchmarks/, never asserted in tests.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..dtypes import precision
from ..export.config import ModelConfig


@dataclass(frozen=True)
class DecodeRun:
    """One timed greedy run: ms to the first token, ms between successive tokens, the tokens of each prompt."""

    prefill_ms: float
    step_ms: list[float]
    tokens: list[list[int]]

    def decode_ms(self, warmup: int = 8) -> float:
        """Median ms per decode step after ``warmup`` steps (all steps when the run is too short to drop any)."""
        return statistics.median(self.step_ms[warmup:] if len(self.step_ms) > warmup + 4 else self.step_ms)


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """The shared benchmark prompts: seeded random ids in [3, vocab) (above the usual pad / bos / eos ids)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, prompt_len), generator=g).tolist()


def first_divergence(a: list[list[int]], b: list[list[int]]) -> int:
    """The first step at which any prompt's tokens differ between two runs (the shorter length when none does)."""
    return min(next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q))) for p, q in zip(a, b))


def timed_generate(runner: Any, prompts: list[list[int]], new_tokens: int, state: Any = None,
                   sampling: Any = None) -> DecodeRun:
    """The loop `decodekit generate` runs (runtime.generate: tokens streamed to the host), greedy, no early stop."""
    from ..runtime.generate import generate
    from ..runtime.sampler import SamplingConfig

    stamps, tokens = [], [[] for _ in prompts]
    t0 = time.perf_counter()
    for ev in generate(runner, prompts, new_tokens, sampling or SamplingConfig(logprobs=False), eos_ids=(),
                       state=state):
        stamps.append(time.perf_counter())
        for b, t in ev.new_tokens().items():
            tokens[b].append(t)
    return DecodeRun((stamps[0] - t0) * 1e3, [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])], tokens)


class DecodekitRunner:
    """A decodekit backend on an artifact with one state of ``batch`` rows, run by the loop `decodekit generate`
    runs; ``logprobs`` as `generate --logprobs`."""

    def __init__(self, artifact: str | Path, batch: int, backend: str = "ort", logprobs: bool = False,
                 **options: Any) -> None:
        from ..runtime.pipeline import open_backend
        from ..runtime.sampler import SamplingConfig

        self.backend = open_backend(artifact, backend, **options)
        self.state = self.backend.allocate(batch)
        self.sampling = SamplingConfig(logprobs=logprobs)

    def run(self, prompts: list[list[int]], steps: int) -> DecodeRun:
        return timed_generate(self.backend, prompts, steps, self.state, self.sampling)

    def close(self) -> None:
        self.backend.close()


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


def dtype_bytes(name: str) -> int:
    return precision(name).itemsize


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


def read_bandwidth(device: str) -> float:
    """Bytes/s of the memory bandwidth that bounds a decode step on ``device``, measured now."""
    return cpu_read_bandwidth() if device == "cpu" else gpu_copy_bandwidth()


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
