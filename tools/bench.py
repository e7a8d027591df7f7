"""`decodekit bench` as a library: prefill tokens/s and decode ms/token (median after warm-up) of a backend,
with the memory-bandwidth roofline measured in the same run (tools/benchmarking.py, shared with benchmarks/)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..export.manifest import read_manifest
from .benchmarking import DecodekitRunner, artifact_weight_bytes, kv_bytes, random_prompts, read_bandwidth


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
    prompts = random_prompts(batch, prompt_len, c.vocab_size, seed)
    options = dict(backend_options or {})
    if backend in ("ort", "torch"):
        options.setdefault("device", device)
    runner = DecodekitRunner(artifact, batch, backend, **options)
    try:
        runner.run(prompts, 4)  # warm-up: sessions, allocators, the captured step
        run = runner.run(prompts, new_tokens)
    finally:
        runner.close()
    bw = read_bandwidth(device)
    decode_ms = run.decode_ms(warmup)
    moved = artifact_weight_bytes(manifest) + kv_bytes(c, manifest.dtype, batch, prompt_len + new_tokens // 2)
    return BenchResult(backend, device, manifest.dtype, batch, prompt_len, new_tokens, run.prefill_ms,
                       batch * prompt_len / run.prefill_ms * 1e3, decode_ms, batch / decode_ms * 1e3, bw, moved,
                       moved / bw / (decode_ms / 1e3))
