"""GPU decode at the HBM roofline: decodekit's variants beside the PyTorch baselines, one command per device.

    python benchmarks/gpu_roofline.py --models llama-3.2-1b --dtypes fp16 --batches 1,8 \
        --systems decodekit,torch-compile,transformers-static,torch-eager --profile --out OUT.json [--plot OUT.png]
    python benchmarks/gpu_roofline.py --merge A.json B.json --out MERGED.json --plot MERGED.png   # runs split in time
    python benchmarks/gpu_roofline.py --replot --out OUT.json --plot OUT.png                      # only draw

Per model / dtype / batch (a random checkpoint of the preset's shape made with transformers' own classes; every
system reads its weights): decode ms per step of each system of the harness's registry (--systems; decodekit's
variants are registry entries: decodekit-nograph, -int4-sym, -nofuse, -qkvonly, -nk, -untied, -std-no-nonpad),
one system at a time (GPU memory), median over steps 8.. after a warm-up run; tokens/s; and the roofline
fraction: (weight bytes the system reads + K/V bytes at mid-generation) / measured D2D copy bandwidth / its step.
Greedy tokens: first divergence from torch-eager's (correctness itself: `decodekit validate --device cuda`).
--profile: CUDA kernel time per step (CUPTI sees every library's kernels) and where the step goes (weight-reading
kernels, other kernels, launch gaps; the best fraction this execution allows). --gemm-ceiling: the step's linear
layers alone in cuBLAS (benchmarks/gemm_ceiling.py). A system that fails is recorded in the JSON, not fatal.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from harness import Checkpoint, bar_plot, compare_tokens, dense_step_bytes, kv_bytes, log, random_prompts, \
    read_bandwidth, run_systems, save_json, study_parser, systems_option, weight_bytes

# the weight-reading kernels: cuBLAS (nvjet / gemm / gemv and its split-K reduction), ORT's MatMulNBits kernels
GEMM_KERNEL = re.compile(r"nvjet|gemm|gemv|splitKreduce|MatMulFloat\dBits|Dequantize\dBits", re.IGNORECASE)


def kernel_profile(fn: Any, steps: int) -> dict[str, Any]:
    """CUDA kernel time per decode step of fn() (which runs `steps` decode steps)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    totals: dict[str, float] = {}
    launches = 0
    for e in prof.events():
        if e.device_type.name == "CUDA":
            totals[e.name] = totals.get(e.name, 0.0) + e.device_time / 1e3
            launches += 1
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:12]
    return {"kernel_ms_per_step": sum(totals.values()) / steps, "kernels_per_step": launches / steps,
            "gemm_kernel_ms_per_step": sum(v for k, v in totals.items() if GEMM_KERNEL.search(k)) / steps,
            "top": [(k[:90], round(v / steps, 4)) for k, v in top]}


def overhead_budget(ms: float, kernels: dict[str, Any], step_bytes: int, bw: float) -> dict[str, Any]:
    """Where a step's time goes, and the best roofline fraction this execution model allows: the step with its
    weight-reading kernels at the measured copy bandwidth and everything else (other kernels, launch gaps) as
    measured. A target fraction f leaves (1/f - 1) x floor for everything that is not reading weights."""
    floor = step_bytes / bw * 1e3
    gemm = kernels["gemm_kernel_ms_per_step"]
    other = kernels["kernel_ms_per_step"] - gemm
    gaps = max(ms - kernels["kernel_ms_per_step"], 0.0)
    return {"floor_ms": floor, "gemm_ms": gemm, "other_kernels_ms": other, "gaps_ms": gaps,
            "gemm_fraction_of_copy_bw": floor / gemm if gemm else None,
            "best_fraction_with_gemms_at_copy_bw": floor / (floor + other + gaps),
            "non_gemm_budget_ms_at_80pct": floor / 0.8 - floor, "non_gemm_budget_ms_at_85pct": floor / 0.85 - floor}


def bench_one(name: str, dtype: str, batches: list[int], systems: dict[str, Any], a: argparse.Namespace,
              bw: float) -> list[dict[str, Any]]:
    ck = Checkpoint.make(name, Path(a.work), dtype, a.device, a.prompt_len + a.steps + 32, max(batches))
    config, kv_len, rows = ck.config, a.prompt_len + a.steps // 2, []
    for batch in batches:
        prompts = random_prompts(batch, a.prompt_len, config.vocab_size)
        profile = (lambda s, runner: {"kernels": kernel_profile(lambda: runner.run(prompts, 33), 32)}) \
            if a.profile else None
        out = run_systems(systems, ck, prompts, a.steps, a.rounds, alternate=False, after=profile)
        compare_tokens(out, "torch-eager")
        row = {"model": name, "dtype": dtype, "batch": batch, "prompt_len": a.prompt_len, "steps": a.steps,
               "weight_bytes": weight_bytes(config, dtype), "kv_bytes_mid": kv_bytes(config, dtype, batch, kv_len),
               "copy_bw_Bps": bw, "roofline_ms": dense_step_bytes(ck, batch, kv_len) / bw * 1e3, "systems": {}}
        for s, o in out.items():
            r = o.to_dict()
            moved = systems[s].step_bytes(ck, batch, kv_len)
            if o.ms and moved:
                r.update(tokens_per_s=batch * 1e3 / o.ms, roofline_fraction=moved / bw * 1e3 / o.ms,
                         bytes_per_step=moved)
                if "kernels" in r:
                    r["budget"] = overhead_budget(o.ms, r["kernels"], moved, bw)
            row["systems"][s] = r
        if a.gemm_ceiling:
            from gemm_ceiling import gemm_ceiling

            row["gemm_ceiling"] = gemm_ceiling(config, dtype, batch)
        rows.append(row)
        print_rows([row])
    return rows


def merge_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, dtype, batch): systems of later runs join the first row (each system keeps the roofline
    fraction of its own run); a failed system never replaces a measured one."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["model"], r["dtype"], r["batch"])
        if key not in out:
            out[key] = {**r, "systems": dict(r["systems"])}
            continue
        for name, v in r["systems"].items():
            if "ms" in v or "ms" not in out[key]["systems"].get(name, {}):
                out[key]["systems"][name] = v
        for k in ("gemm_ceiling", "prefill_logits_vs_torch"):
            out[key].setdefault(k, r.get(k))
    return list(out.values())


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    names = list(dict.fromkeys(s for r in rows for s in r["systems"]))
    series = {s: [r["systems"].get(s, {}).get("ms") for r in rows] for s in names}
    series["roofline"] = [r["roofline_ms"] for r in rows]
    bar_plot([f"{r['model']}\n{r['dtype']} b{r['batch']}" for r in rows], series, path,
             "decode ms / step (lower is better)")


def print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        for s, v in r["systems"].items():
            head = f"{r['model']:14} {r['dtype']:5} {r['batch']:>2} {s:28}"
            print(f"{head} {v['ms']:8.3f} ms {v.get('tokens_per_s', 0):8.0f} tok/s "
                  f"{v.get('roofline_fraction', 0) * 100:6.1f}% of the roofline" if v.get("ms") else
                  f"{head} {v.get('error', '')[:80]}")
            if "budget" in v:
                b = v["budget"]
                print(f"   {s}: weight kernels {b['gemm_ms']:.3f} + other kernels {b['other_kernels_ms']:.3f} + gaps "
                      f"{b['gaps_ms']:.3f} ms; with weight kernels at copy bandwidth: "
                      f"{b['best_fraction_with_gemms_at_copy_bw'] * 100:.1f}%")
        print(f"   roofline {r['roofline_ms']:.3f} ms")
        for k, v in (r.get("gemm_ceiling") or {}).items():
            print(f"   GEMM ceiling {k}: {v['ms']:.3f} ms/step ({v['TBps']:.2f} TB/s)")


def main(argv: list[str] | None = None) -> None:
    ap = study_parser(__doc__, "/tmp/decodekit-bench", "decodekit,decodekit-std-no-nonpad,torch-eager,torch-compile,"
                      "transformers-static", batches="1,8", out_required=True)
    ap.add_argument("--models", default="llama-3.2-1b")
    ap.add_argument("--dtypes", default="fp16")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the same study against the CPU's read bandwidth (a small run, e.g. to check the study)")
    ap.add_argument("--profile", action="store_true", help="CUDA kernel time per step of every system")
    ap.add_argument("--gemm-ceiling", action="store_true", help="the step's linear layers alone in cuBLAS")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="run nothing: merge earlier results of one device")
    ap.add_argument("--replot", action="store_true", help="run nothing: draw --plot from the --out JSON")
    ap.set_defaults(rounds=1)
    a = ap.parse_args(argv)
    if a.replot or a.merge:
        docs = [json.loads(Path(f).read_text()) for f in (a.merge or [a.out])]
        if len({d["device"] for d in docs}) != 1:
            raise SystemExit(f"refusing to merge results of different devices: {sorted({d['device'] for d in docs})}")
        doc = {"device": docs[0]["device"], "copy_bw_Bps": [d["copy_bw_Bps"] for d in docs],
               "rows": merge_rows([r for d in docs for r in d["rows"]])} if a.merge else docs[0]
    else:
        import platform

        import torch

        systems = systems_option(a.systems)
        bw = read_bandwidth(a.device)
        device = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu {platform.processor()}"
        log(f"{device}: memory bandwidth {bw / 1e12:.2f} TB/s (CUDA: a D2D copy, read + write)")
        doc = {"device": device, "copy_bw_Bps": bw, "rows": []}
        for name in a.models.split(","):
            for dtype in a.dtypes.split(","):
                doc["rows"] += bench_one(name, dtype, [int(b) for b in a.batches.split(",")], systems, a, bw)
                save_json(doc, a.out)
    if a.merge:
        save_json(doc, a.out)
    if a.plot:
        plot(doc["rows"], Path(a.plot))
    if a.merge or a.replot:
        print_rows(doc["rows"])


if __name__ == "__main__":
    main()
