"""GPU decode benchmark (issue: decode at the HBM roofline): one command, all systems side by side.

    python -m decodekit.tools.bench_gpu --models llama-3.2-1b,qwen2.5-0.5b --dtypes fp16,bf16 --batches 1,8 \
        --out results/gpu.json [--plot results/gpu.png]

Per model/dtype/batch: decode ms/token (median of per-step CUDA-event times after warm-up) and tokens/s for
  ort:DIALECT[:nograph]     decodekit's ONNX Runtime CUDA path (CUDA graph, GPU sampling, in-place cache)
  torch-eager               decodekit's PyTorch reference Decoder, eager
  torch-compile             the same Decoder under torch.compile(mode="reduce-overhead") (gpt-fast style)
  hf-static                 transformers generate() with a static cache
and the roofline fraction: (weight bytes + KV bytes read per step) / step time / measured D2D copy bandwidth.
Correctness first: greedy tokens of ort vs the PyTorch reference on the GPU, and the prefill logits error.
Each system runs in a try block: a failure is recorded in the JSON, not fatal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

from ..export.config import preset
from .benchmarking import gpu_copy_bandwidth, kv_bytes, weight_bytes


def log(msg: str) -> None:
    print(f"[bench-gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def export_fp(name: str, dtype: str, max_seq: int, work: Path, dialects: list[str]) -> dict[str, Path]:
    from ..export.artifact import ExportOptions, export_artifact

    std = work / f"{name}-{dtype}-std"
    if not (std / "manifest.json").exists():
        t = time.perf_counter()
        export_artifact(f"preset:{name}", std, ExportOptions(dtype=dtype, max_seq=max_seq, max_batch=8,
                                                             logits="last", force=True), progress=log)
        log(f"export {name} {dtype}: {time.perf_counter() - t:.0f} s")
    out = {"std": std}
    variants = {"std-nononpad": "std", "gqa-static": "ort-gqa-uniform"}
    for d in sorted(dialects, key=lambda d: d in variants):
        if d == "std":
            continue
        if d in variants:
            from .bench_variants import make_variant

            if variants[d] in out:
                out[d] = make_variant(out[variants[d]], work / f"{name}-{dtype}-{d}", d)
            continue
        path = work / f"{name}-{dtype}-{d}"
        try:
            if not (path / "manifest.json").exists():
                from ..graphs.pipeline import optimize

                optimize(std, path, dialect=d, force=True)
            out[d] = path
        except Exception as e:  # noqa: BLE001 - a dialect that fails to lower is reported, not fatal
            log(f"optimize {d} failed: {e}")
    return out


def prompts_for(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, prompt_len), generator=g).tolist()


def run_ort(path: Path, batch: int, prompts, steps: int, graph: bool, prefill: Path | None = None) -> dict:
    from ..runtime.ort_cuda import CudaDecodeOptions, OrtCudaDecoder

    dec = OrtCudaDecoder(path, batch, CudaDecodeOptions(cuda_graph=graph, logprobs=False), prefill_artifact=prefill)
    dec.generate(prompts, 16)  # warm-up (+ graph capture)
    times: list[float] = []
    tokens = dec.generate(prompts, steps, timings=times)
    result = {"ms": statistics.median(times[8:]), "tokens": tokens}
    if PROFILE:
        result["kernels"] = kernel_profile(lambda: dec.generate(prompts, 33), 32)
    del dec
    return result


PROFILE = False


def kernel_profile(fn, steps: int) -> dict:
    """CUDA kernel time per decode step (CUPTI sees every library's kernels: ORT's, cuBLAS', torch's)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    totals: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            totals[e.name] = totals.get(e.name, 0.0) + e.device_time / 1e3
    total = sum(totals.values()) / steps
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:8]
    return {"kernel_ms_per_step": total, "top": [(k[:90], round(v / steps, 4)) for k, v in top]}


def run_torch(name: str, dtype: str, batch: int, prompts, steps: int, max_seq: int, compiled: bool) -> dict:
    import torch

    from .bench_torch import TorchDecode, torch_model

    model = torch_model(preset(name), dtype, max_seq)
    dec = TorchDecode(model, batch, max_seq, compiled=compiled)
    p = torch.tensor(prompts, device="cuda")
    dec.decode(dec.prefill(p), 16 if compiled else 4)  # warm-up / compile + graph capture
    first = dec.prefill(p)
    tokens, times = dec.decode(first, steps - 1)
    out = [[int(first[b])] + [t[b] for t in tokens] for b in range(batch)]
    del model, dec
    torch.cuda.empty_cache()
    return {"ms": statistics.median(times[8:]), "tokens": out}


def prefill_logits_error(name: str, dtype: str, path: Path, prompts, max_seq: int) -> dict:
    import torch

    from ..runtime.ort_cuda import CudaDecodeOptions, OrtCudaDecoder
    from .bench_torch import TorchDecode, torch_model

    dec = OrtCudaDecoder(path, len(prompts), CudaDecodeOptions(cuda_graph=False))
    ort_logits = dec.prefill(prompts).float()
    torch.cuda.synchronize()
    model = torch_model(preset(name), dtype, max_seq)
    ref = TorchDecode(model, len(prompts), max_seq)
    with torch.inference_mode():
        S = len(prompts[0])
        p = torch.tensor(prompts, device="cuda")
        lg, _ = model(p, torch.arange(S, device="cuda").repeat(len(prompts), 1),
                      torch.zeros(len(prompts), dtype=torch.long, device="cuda"),
                      torch.full((len(prompts),), S, device="cuda"), ref.cache, logits="last")
    lg = lg[:, -1].float()
    err = (ort_logits - lg).abs()
    return {"max_abs": float(err.max()), "mean_abs": float(err.mean()), "logit_scale": float(lg.abs().max()),
            "top1_agree": float((ort_logits.argmax(-1) == lg.argmax(-1)).float().mean())}


def bench_one(name: str, dtype: str, batches: list[int], systems: list[str], steps: int, prompt_len: int,
              work: Path, bw: float) -> list[dict]:
    from .bench_torch import hf_static_ms

    config = preset(name)
    max_seq = prompt_len + steps + 32
    dialects = sorted({s.split(":")[1] for s in systems if s.startswith("ort:")})
    if "gqa-static" in dialects:
        dialects.append("ort-gqa-uniform")
    paths = export_fp(name, dtype, max_seq, work, dialects)
    rows = []
    for batch in batches:
        prompts = prompts_for(batch, prompt_len, config.vocab_size)
        row: dict = {"model": name, "dtype": dtype, "batch": batch, "prompt_len": prompt_len, "steps": steps,
                     "weight_bytes": weight_bytes(config, dtype),
                     "kv_bytes_mid": kv_bytes(config, dtype, batch, prompt_len + steps // 2),
                     "copy_bw_Bps": bw, "systems": {}}
        floor_ms = (row["weight_bytes"] + row["kv_bytes_mid"]) / bw * 1e3
        row["roofline_ms"] = floor_ms
        for system in systems:
            log(f"{name} {dtype} batch {batch}: {system}")
            import torch

            torch.cuda.empty_cache()
            try:
                if system.startswith("ort:"):
                    _, d, *flags = system.split(":")
                    graph = "nograph" not in flags
                    if d not in paths:
                        raise RuntimeError(f"no {d} artifact")
                    prefill = paths["std"] if "stdprefill" in flags else None
                    r = run_ort(paths[d], batch, prompts, steps, graph, prefill)
                elif system in ("torch-eager", "torch-compile"):
                    r = run_torch(name, dtype, batch, prompts, steps, max_seq, system == "torch-compile")
                elif system == "hf-static":
                    r = {"ms": hf_static_ms(config, dtype, batch, prompt_len, steps)}
                else:
                    raise ValueError(f"unknown system {system}")
                r["tokens_per_s"] = batch * 1e3 / r["ms"]
                r["roofline_fraction"] = floor_ms / r["ms"]
                row["systems"][system] = r
                log(f"  {r['ms']:.3f} ms/step  {r['roofline_fraction'] * 100:.1f}% of roofline")
            except Exception as e:  # noqa: BLE001
                row["systems"][system] = {"error": f"{type(e).__name__}: {e}"}
                log(f"  FAILED: {e}")
                traceback.print_exc(limit=3)
        ref = row["systems"].get("torch-eager", {}).get("tokens")
        for system, r in row["systems"].items():
            if ref and "tokens" in r:
                same = [a[:64] == b[:64] for a, b in zip(r["tokens"], ref)]
                r["greedy64_identical_to_torch"] = all(same)
                r["first_divergence"] = min((next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                                             for a, b in zip(r["tokens"], ref)), default=None)
        try:
            row["prefill_logits_vs_torch"] = prefill_logits_error(name, dtype, paths["std"], prompts, max_seq)
        except Exception as e:  # noqa: BLE001
            row["prefill_logits_vs_torch"] = {"error": str(e)}
        for r in row["systems"].values():
            r.pop("tokens", None)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['dtype']} b{r['batch']}" for r in rows]
    systems = sorted({s for r in rows for s in r["systems"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4.5))
    w = 0.8 / (len(systems) + 1)
    for i, s in enumerate(systems):
        ax.bar([x + i * w for x in range(len(rows))], [r["systems"].get(s, {}).get("ms", 0) for r in rows], w, label=s)
    ax.bar([x + len(systems) * w for x in range(len(rows))], [r["roofline_ms"] for r in rows], w, label="roofline",
           color="black", alpha=0.3)
    ax.set_xticks([x + 0.4 for x in range(len(rows))], labels, fontsize=8)
    ax.set_ylabel("decode ms / step (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-3.2-1b")
    ap.add_argument("--dtypes", default="fp16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--systems", default="ort:std,ort:ort-gqa-uniform,torch-eager,torch-compile,hf-static")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--work", default="/tmp/decodekit-bench")
    ap.add_argument("--out", default="results/gpu.json")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--profile", action="store_true", help="CUDA kernel time per step of the ORT systems")
    a = ap.parse_args(argv)
    global PROFILE
    PROFILE = a.profile
    import torch

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    bw = gpu_copy_bandwidth()
    log(f"{torch.cuda.get_device_name()}: D2D copy {bw / 1e12:.2f} TB/s (read + write)")
    rows = []
    for name in a.models.split(","):
        for dtype in a.dtypes.split(","):
            rows += bench_one(name, dtype, [int(b) for b in a.batches.split(",")], a.systems.split(","), a.steps,
                              a.prompt_len, work, bw)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_bw_Bps": bw,
                                               "rows": rows}, indent=1))
    if a.plot:
        plot(rows, Path(a.plot))
    print(f"{'model':14} {'dt':5} {'b':>2} {'system':16} {'ms/step':>8} {'tok/s':>8} {'roof%':>6} greedy64")
    for r in rows:
        for s, v in r["systems"].items():
            if "ms" in v:
                print(f"{r['model']:14} {r['dtype']:5} {r['batch']:>2} {s:16} {v['ms']:8.3f} {v['tokens_per_s']:8.0f} "
                      f"{v['roofline_fraction'] * 100:6.1f} {v.get('greedy64_identical_to_torch', '')}")
            else:
                print(f"{r['model']:14} {r['dtype']:5} {r['batch']:>2} {s:16} {v.get('error', '')[:80]}")
        print(f"   roofline {r['roofline_ms']:.3f} ms; prefill logits vs torch: {r.get('prefill_logits_vs_torch')}")
        for s, v in r["systems"].items():
            if "kernels" in v:
                print(f"   {s}: kernels {v['kernels']['kernel_ms_per_step']:.3f} ms/step; top {v['kernels']['top'][:4]}")


if __name__ == "__main__":
    main()
