"""GPU decode benchmark (issue: decode at the HBM roofline): one command, all systems side by side.

    python -m decodekit.tools.bench_gpu --models llama-3.2-1b,qwen2.5-0.5b --dtypes fp16,bf16 --batches 1,8 \
        --out results/gpu.json [--plot results/gpu.png]

Per model/dtype/batch: decode ms/token (median of per-step CUDA-event times after warm-up) and tokens/s for
  ort:DIALECT[:FLAG...]     decodekit's ONNX Runtime CUDA path (CUDA graph, GPU sampling, in-place cache) on the
                            std export optimized into DIALECT (or the std-nononpad variant); flags: nograph (no
                            CUDA graph), int4 / int8 (weight-only,
                            block 32, symmetric; the roofline then counts the packed bytes), nofuse (keep q/k/v
                            and gate/up MatMuls apart), qkvonly (fuse q/k/v, keep gate/up apart: no Split
                            before SwiGLU), nk ([N, K] weights via FusedMatMul transB=1), untied (a tied LM head
                            multiplies by Transpose(table), which ONNX Runtime folds into a second copy at load)
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
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

from ..export.config import preset
from ..export.manifest import read_manifest
from .benchmarking import artifact_weight_bytes, gpu_copy_bandwidth, kv_bytes, weight_bytes


def log(msg: str) -> None:
    print(f"[bench-gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def export_std(name: str, dtype: str, max_seq: int, work: Path) -> Path:
    from ..export.artifact import ExportOptions, export_artifact

    std = work / f"{name}-{dtype}-std"
    if not (std / "manifest.json").exists():
        t = time.perf_counter()
        export_artifact(f"preset:{name}", std, ExportOptions(dtype=dtype, max_seq=max_seq, max_batch=8,
                                                             logits="last", force=True), progress=log)
        log(f"export {name} {dtype}: {time.perf_counter() - t:.0f} s")
    return std


VARIANTS = {"std-nononpad": "std"}  # measurement-only graph surgery (tools/bench_variants.py) on an optimized dialect
FLAGS = {"nograph", "int4", "int8", "nofuse", "qkvonly", "nk", "untied"}


def artifact_for(std: Path, work: Path, dialect: str, flags: set[str]) -> Path:
    """The artifact an `ort:DIALECT:flags` system runs, optimized from the std export once per work folder."""
    from ..graphs.passes.quantize import QuantOptions
    from ..graphs.pipeline import PassOptions, optimize

    quant = next((f for f in flags if f in ("int4", "int8")), None)
    fuse = "nofuse" not in flags
    base = VARIANTS.get(dialect, dialect)
    nk = "nk" in flags
    members = 3 if "qkvonly" in flags else 2  # qkvonly: q/k/v fused, gate/up apart (no Split before SwiGLU)
    tied = "untied" not in flags  # untied: the LM head multiplies by a Transpose of the table (folded at load)
    tag = (f"{base}{'' if fuse else '-nofuse'}{'-qkvonly' if members == 3 else ''}{'-nk' if nk else ''}"
           f"{'' if tied else '-untied'}"
           f"{'-' + quant if quant else ''}")
    path = work / f"{std.name.removesuffix('-std')}-{tag}"
    if not (path / "manifest.json").exists():
        t = time.perf_counter()
        optimize(std, path, dialect=base, force=True,
                 options=PassOptions(fuse_projections=fuse, fuse_min_members=members, tied_lm_head=tied, weights_nk=nk),
                 quantize=QuantOptions(bits=int(quant[3:]), block_size=32) if quant else None)
        log(f"optimize {path.name}: {time.perf_counter() - t:.0f} s")
    if dialect in VARIANTS:
        from .bench_variants import make_variant

        variant = work / f"{path.name}+{dialect}"
        if not (variant / "manifest.json").exists():
            make_variant(path, variant, dialect)
        path = variant
    return path


def prompts_for(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, prompt_len), generator=g).tolist()


def run_ort(path: Path, batch: int, prompts, steps: int, graph: bool) -> dict:
    from ..runtime.ort_backend import OrtBackend
    from .bench import timed_generate

    with OrtBackend(path, device="cuda", cuda_graph=graph) as runner:
        state = runner.allocate(batch)
        timed_generate(runner, prompts, 16, state)  # warm-up (+ graph capture)
        _, times, tokens = timed_generate(runner, prompts, steps, state)
        result = {"ms": statistics.median(times[8:]), "tokens": tokens}
        if PROFILE:
            result["kernels"] = kernel_profile(lambda: timed_generate(runner, prompts, 33, state), 32)
    return result


PROFILE = False
GEMV = False


def kernel_profile(fn, steps: int) -> dict:
    """CUDA kernel time per decode step (CUPTI sees every library's kernels: ORT's, cuBLAS', torch's)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    totals: dict[str, float] = {}
    launches = 0
    for e in prof.events():
        if e.device_type.name == "CUDA":
            totals[e.name] = totals.get(e.name, 0.0) + e.device_time / 1e3
            launches += 1
    total = sum(totals.values()) / steps
    gemm = sum(v for k, v in totals.items() if GEMM_KERNEL.search(k)) / steps
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:12]
    return {"kernel_ms_per_step": total, "kernels_per_step": launches / steps, "gemm_kernel_ms_per_step": gemm,
            "top": [(k[:90], round(v / steps, 4)) for k, v in top]}


# the weight-reading kernels: cuBLAS (nvjet / gemm / gemv and its split-K reduction), ORT's MatMulNBits kernels
GEMM_KERNEL = re.compile(r"nvjet|gemm|gemv|splitKreduce|MatMulFloat\dBits|Dequantize\dBits", re.IGNORECASE)


def overhead_budget(ms: float, kernels: dict, weight_bytes: int, kv_bytes: int, bw: float) -> dict:
    """Where a step's time goes, and the best roofline fraction this execution model allows: the step with its
    weight-reading kernels at the measured copy bandwidth and everything else (other kernels, launch gaps) as
    measured. A target fraction f leaves (1/f - 1) x floor for everything that is not reading weights."""
    floor = (weight_bytes + kv_bytes) / bw * 1e3
    gemm = kernels["gemm_kernel_ms_per_step"]
    other = kernels["kernel_ms_per_step"] - gemm
    gaps = max(ms - kernels["kernel_ms_per_step"], 0.0)
    return {"floor_ms": floor, "gemm_ms": gemm, "other_kernels_ms": other, "gaps_ms": gaps,
            "gemm_fraction_of_copy_bw": floor / gemm if gemm else None,
            "best_fraction_with_gemms_at_copy_bw": floor / (floor + other + gaps),
            "non_gemm_budget_ms_at_80pct": floor / 0.8 - floor, "non_gemm_budget_ms_at_85pct": floor / 0.85 - floor}


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

    import numpy as np

    from ..runtime.ort_backend import OrtBackend
    from .bench_torch import TorchDecode, torch_model

    with OrtBackend(path, device="cuda", cuda_graph=False) as runner:
        B, S = len(prompts), len(prompts[0])
        ids = np.array(prompts, dtype=np.int64)
        lens = np.full(B, S, dtype=np.int64)
        ort_logits = runner.step(runner.allocate(B), ids, np.tile(np.arange(S), (B, 1)), np.zeros(B, np.int64),
                                 lens)[:, -1].float()
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
    std = export_std(name, dtype, max_seq, work)
    paths: dict[str, Path | Exception] = {}
    for system in systems:
        if system.startswith("ort:"):
            _, d, *flags = system.split(":")
            if set(flags) - FLAGS:
                raise SystemExit(f"unknown flag(s) {sorted(set(flags) - FLAGS)} in {system}; known: {sorted(FLAGS)}")
            try:
                paths[system] = artifact_for(std, work, d, set(flags))
            except Exception as e:  # noqa: BLE001 - a dialect that fails to lower is reported, not fatal
                paths[system] = e
                log(f"{system}: {e}")
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
                bytes_read = row["weight_bytes"]
                if system.startswith("ort:"):
                    flags = system.split(":")[2:]
                    path = paths[system]
                    if isinstance(path, Exception):
                        raise path
                    r = run_ort(path, batch, prompts, steps, "nograph" not in flags)
                    bytes_read = artifact_weight_bytes(read_manifest(path, verify=False))
                    if bytes_read != row["weight_bytes"]:
                        r["weight_bytes"] = bytes_read
                elif system in ("torch-eager", "torch-compile"):
                    r = run_torch(name, dtype, batch, prompts, steps, max_seq, system == "torch-compile")
                elif system == "hf-static":
                    r = {"ms": hf_static_ms(config, dtype, batch, prompt_len, steps)}
                else:
                    raise ValueError(f"unknown system {system}")
                if "kernels" in r:
                    r["budget"] = overhead_budget(r["ms"], r["kernels"], bytes_read, row["kv_bytes_mid"], bw)
                r["tokens_per_s"] = batch * 1e3 / r["ms"]
                r["roofline_fraction"] = (bytes_read + row["kv_bytes_mid"]) / bw * 1e3 / r["ms"]
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
        if GEMV:
            from .bench_gemv import gemm_ceiling

            row["gemm_ceiling"] = gemm_ceiling(config, dtype, batch)
            log("  GEMM ceiling (ms/step): " + ", ".join(f"{k} {v['ms']:.3f}" for k, v in row["gemm_ceiling"].items()))
        try:
            row["prefill_logits_vs_torch"] = prefill_logits_error(name, dtype, std, prompts, max_seq)
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
    ap.add_argument("--systems", default="ort:ort-gqa-static,ort:std-nononpad,torch-eager,torch-compile,hf-static")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--work", default="/tmp/decodekit-bench")
    ap.add_argument("--out", default="results/gpu.json")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--profile", action="store_true", help="CUDA kernel time per step of the ORT systems")
    ap.add_argument("--gemm-ceiling", action="store_true",
                    help="also time the step's linear layers alone in cuBLAS (tools/bench_gemv.py)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="run nothing: concatenate the rows of earlier result files (one device, e.g. runs split to "
                         "fit a time limit) into --out, and --plot them")
    a = ap.parse_args(argv)
    if a.merge:
        docs = [json.loads(Path(f).read_text()) for f in a.merge]
        if len({d["device"] for d in docs}) != 1:
            raise SystemExit(f"refusing to merge results of different devices: {sorted({d['device'] for d in docs})}")
        merged = {"device": docs[0]["device"], "copy_bw_Bps": [d["copy_bw_Bps"] for d in docs],
                  "rows": merge_rows([r for d in docs for r in d["rows"]])}
        Path(a.out).write_text(json.dumps(merged, indent=1))
        if a.plot:
            plot(merged["rows"], Path(a.plot))
        print_rows(merged["rows"])
        return
    global PROFILE, GEMV
    PROFILE, GEMV = a.profile, a.gemm_ceiling
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
    print_rows(rows)


def merge_rows(rows: list[dict]) -> list[dict]:
    """One row per (model, dtype, batch): systems of later runs join the first row (each system keeps the roofline
    fraction of its own run); a failed system never replaces a measured one."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r["dtype"], r["batch"])
        if key not in out:
            out[key] = {**r, "systems": dict(r["systems"])}
            continue
        row = out[key]
        for name, v in r["systems"].items():
            if "ms" in v or "ms" not in row["systems"].get(name, {}):
                row["systems"][name] = v
        for k in ("gemm_ceiling", "prefill_logits_vs_torch"):
            row.setdefault(k, r.get(k))
    return list(out.values())


def print_rows(rows: list[dict]) -> None:
    print(f"{'model':14} {'dt':5} {'b':>2} {'system':28} {'ms/step':>8} {'tok/s':>8} {'roof%':>6} greedy64")
    for r in rows:
        for s, v in r["systems"].items():
            if "ms" in v:
                print(f"{r['model']:14} {r['dtype']:5} {r['batch']:>2} {s:28} {v['ms']:8.3f} {v['tokens_per_s']:8.0f} "
                      f"{v['roofline_fraction'] * 100:6.1f} {v.get('greedy64_identical_to_torch', '')}")
            else:
                print(f"{r['model']:14} {r['dtype']:5} {r['batch']:>2} {s:28} {v.get('error', '')[:80]}")
        print(f"   roofline {r['roofline_ms']:.3f} ms; prefill logits vs torch: {r.get('prefill_logits_vs_torch')}")
        for k, v in r.get("gemm_ceiling", {}).items():
            print(f"   GEMM ceiling {k}: {v['ms']:.3f} ms/step ({v['TBps']:.2f} TB/s)")
        for s, v in r["systems"].items():
            if "kernels" in v:
                k = v["kernels"]
                print(f"   {s}: kernels {k['kernel_ms_per_step']:.3f} ms/step ({k.get('kernels_per_step', 0):.0f} "
                      f"launches); top {k['top'][:4]}")
            if "budget" in v:
                b = v["budget"]
                print(f"   {s}: weight kernels {b['gemm_ms']:.3f} + other kernels {b['other_kernels_ms']:.3f} + gaps "
                      f"{b['gaps_ms']:.3f} ms; with weight kernels at copy bandwidth: "
                      f"{b['best_fraction_with_gemms_at_copy_bw'] * 100:.1f}% (80% leaves "
                      f"{b['non_gemm_budget_ms_at_80pct']:.3f} ms for the rest)")


if __name__ == "__main__":
    main()
