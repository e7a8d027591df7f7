"""`decodekit bench` as a library: prefill tokens/s and decode ms/token (median after warm-up) of a backend,
with the memory-bandwidth roofline measured in the same run."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..export.manifest import read_manifest
from .benchmarking import artifact_weight_bytes, cpu_read_bandwidth, kv_bytes


@dataclass(frozen=True)
class BenchResult:
    backend: str
    device: str
    dtype: str
    batch: int
    prompt_len: int
    new_tokens: int
    prefill_ms: float
    prefill_tokens_per_s: float
    decode_ms_per_token: float  # per decode step (batch tokens each)
    decode_tokens_per_s: float
    bandwidth_Bps: float
    bytes_per_step: int
    roofline_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_artifact(artifact: str | Path, backend: str = "ort", device: str = "cpu", batch: int = 1,
                   prompt_len: int = 32, new_tokens: int = 128, warmup: int = 8, seed: int = 0,
                   backend_options: dict[str, Any] | None = None) -> BenchResult:
    """Greedy generation of new_tokens after a prompt_len prompt; decode time = median step after warm-up."""
    manifest = read_manifest(artifact)
    c = manifest.config
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, c.vocab_size, (batch, prompt_len)).tolist()
    prefill_ms, steps = _generic(artifact, backend, device, prompts, new_tokens, backend_options or {})
    bw = cpu_read_bandwidth() if device == "cpu" else _gpu_bw()
    decode_ms = _median_after(steps, warmup)
    moved = artifact_weight_bytes(manifest) + kv_bytes(c, manifest.dtype, batch, prompt_len + new_tokens // 2)
    return BenchResult(backend, device, manifest.dtype, batch, prompt_len, new_tokens, prefill_ms,
                       batch * prompt_len / prefill_ms * 1e3, decode_ms, batch / decode_ms * 1e3, bw, moved,
                       moved / bw / (decode_ms / 1e3))


def _median_after(steps: list[float], warmup: int) -> float:
    return statistics.median(steps[warmup:] if len(steps) > warmup + 4 else steps)


def _gpu_bw() -> float:
    from .benchmarking import gpu_copy_bandwidth

    return gpu_copy_bandwidth()


def _generic(artifact, backend: str, device: str, prompts, new_tokens: int, options: dict) -> tuple[float, list[float]]:
    from ..runtime.pipeline import open_backend

    opts = dict(options)
    if backend in ("ort", "torch"):
        opts.setdefault("device", device)
    with open_backend(artifact, backend, **opts) as runner:
        state = runner.allocate(len(prompts))
        timed_generate(runner, prompts, 4, state)  # warm-up: sessions, allocators, the captured step
        prefill_ms, steps, _ = timed_generate(runner, prompts, new_tokens, state)
    return prefill_ms, steps


def timed_generate(runner, prompts, new_tokens: int, state=None, sampling=None) -> tuple[float, list[float], list]:
    """The loop `decodekit generate` runs (runtime.generate: tokens streamed to the host), greedy, no early stop:
    (ms to the first token, ms between successive tokens, the tokens per prompt)."""
    from ..runtime.generate import generate
    from ..runtime.sampler import SamplingConfig

    stamps, tokens = [], [[] for _ in prompts]
    t0 = time.perf_counter()
    for ev in generate(runner, prompts, new_tokens, sampling or SamplingConfig(logprobs=False), eos_ids=(),
                       state=state):
        stamps.append(time.perf_counter())
        for b, t in ev.new_tokens().items():
            tokens[b].append(t)
    return (stamps[0] - t0) * 1e3, [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])], tokens
