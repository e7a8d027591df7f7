"""The GEMM ceiling of a decode step: cuBLAS time of the step's linear layers alone, per weight layout and fusion.

    python benchmarks/gemm_ceiling.py --model llama-3.2-1b --dtype fp16 --batch 1
    (and `python benchmarks/gpu_roofline.py --gemm-ceiling`, which adds it to every row)

A decode step's weights are read by its MatMuls; this times those MatMuls alone (torch -> cuBLAS, the same
library ONNX Runtime's CUDA MatMul calls), replayed as one CUDA graph over enough distinct weight copies that
nothing is served from the L2. It separates the loss the GEMV kernels themselves cause from the loss of
everything else in a step (attention, norms, launch gaps):

    layout KN   x @ W, W [K, N] row-major: what an ONNX MatMul with the exporter's transposed weight runs
    layout NK   x @ W.T, W [N, K] (torch.nn.functional.linear): the PyTorch baselines' layout
    unfused     q, k, v, o, gate, up, down per layer (+ the LM head)
    fused       qkv, o, gate|up, down per layer (+ the LM head): what graphs/passes/fuse_projections.py emits

Per (layout, fusion): ms per step and the bandwidth it implies (weight bytes / time).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

RING_BYTES = 512 * 2**20  # distinct weight copies per shape: far past the L2


def step_shapes(c: Any, fused: bool) -> list[tuple[int, int, int]]:
    """(K, N, count per step) of every linear layer of one decode step."""
    h, q, kv, i, L = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size, c.num_layers
    layer = [(h, q + 2 * kv, L), (q, h, L), (h, 2 * i, L), (i, h, L)] if fused else \
        [(h, q, L), (h, kv, 2 * L), (q, h, L), (h, i, 2 * L), (i, h, L)]
    return layer + [(h, c.vocab_size, 1)]


def shape_us(k: int, n: int, batch: int, dtype: Any, layout: str, reps: int = 64) -> float:
    """Microseconds of one [batch, K] x [K, N] product, median over 5 replays of a CUDA graph of `reps` calls."""
    import torch

    copies = max(2, min(reps, RING_BYTES // (k * n * dtype.itemsize)))
    ws = [torch.randn((k, n) if layout == "KN" else (n, k), dtype=dtype, device="cuda") * 0.02 for _ in range(copies)]
    x = torch.randn(batch, k, dtype=dtype, device="cuda")
    out = torch.empty(batch, n, dtype=dtype, device="cuda")

    def body() -> None:
        for r in range(reps):
            w = ws[r % copies]
            torch.matmul(x, w if layout == "KN" else w.t(), out=out)

    body()  # cuBLAS picks and loads its kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    del ws, graph
    torch.cuda.empty_cache()
    return sorted(times)[2]


def gemm_ceiling(c: Any, dtype: str, batch: int) -> dict[str, Any]:
    from decodekit.dtypes import precision

    tdtype = precision(dtype).torch
    out: dict[str, Any] = {}
    cache: dict[tuple, float] = {}
    for layout in ("KN", "NK"):
        for fused in (False, True):
            ms, nbytes, per_shape = 0.0, 0, []
            for k, n, count in step_shapes(c, fused):
                if (k, n, layout) not in cache:
                    cache[(k, n, layout)] = shape_us(k, n, batch, tdtype, layout)
                us = cache[(k, n, layout)]
                ms += us * count / 1e3
                nbytes += k * n * tdtype.itemsize * count
                per_shape.append({"K": k, "N": n, "us": round(us, 2),
                                  "TBps": round(k * n * tdtype.itemsize / us / 1e6, 3)})
            out[f"{layout}-{'fused' if fused else 'unfused'}"] = {"ms": ms, "TBps": nbytes / ms / 1e9,
                                                                   "shapes": per_shape}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.2-1b", help="a preset name")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args(argv)
    from decodekit.export.config import preset

    ceiling = gemm_ceiling(preset(a.model), a.dtype, a.batch)
    print(json.dumps({k: {"ms": round(v["ms"], 4), "TBps": round(v["TBps"], 3)} for k, v in ceiling.items()}))


if __name__ == "__main__":
    main()
