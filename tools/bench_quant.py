"""CPU decode benchmark of weight-only int4: decodekit ORT int4 (MatMulNBits) vs ORT fp32 vs transformers eager.

    python -m decodekit.tools.bench_quant [--preset llama-156m] [--bits 4] [--block-size 32] [--asymmetric]
        [--accuracy-level 4] [--quantize-lm-head] [--out results/cpu_quant_llama-156m.json]

Same checkpoint and fp32 artifact as tools/bench_cpu.py (made there if missing, under --work); the quantized
artifact is made from it with `optimize(..., quantize=QuantOptions(...))`. One run, rounds alternate between
the three systems, same prompt, greedy; decode ms/token = median of per-step times after 8 warm-up steps.
Also reported: greedy-token agreement of int4 with fp32 (first divergence) over the generated tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ..export.config import preset
from .bench_cpu import dk_round, hf_round, log, prepare
from .benchmarking import cpu_read_bandwidth


def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="decodekit ORT int4/int8 vs fp32 vs transformers eager on the CPU")
    ap.add_argument("--preset", default="llama-156m")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--asymmetric", action="store_true")
    ap.add_argument("--quantize-lm-head", action="store_true")
    ap.add_argument("--accuracy-level", type=int, default=4,
                    help="MatMulNBits accuracy_level (4: int8 activations in the kernel, 0: fp32 compute)")
    ap.add_argument("--work", default="/tmp/decodekit-bench-cpu")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    a = ap.parse_args(argv)

    import torch
    import transformers

    from ..export.manifest import read_manifest
    from ..graphs.passes.quantize import QuantOptions
    from ..graphs.pipeline import optimize
    from ..runtime.ort_backend import OrtBackend

    work = Path(a.work)
    ckpt, art = prepare(a.preset, work, a.prompt_len, a.new_tokens)
    qopt = QuantOptions(a.bits, a.block_size, not a.asymmetric, a.quantize_lm_head, "ort", a.accuracy_level)
    qart = work / f"artifact-{qopt.scheme}-acc{a.accuracy_level}"
    t0 = time.perf_counter()
    _, report = optimize(art, qart, "std", force=True, quantize=qopt, progress=log)
    quant_s = time.perf_counter() - t0
    qcounts = next(p["counts"] for p in report["ranks"][0]["passes"] if p["name"] == "quantize")
    log(f"{qopt.scheme}: {qcounts} in {quant_s:.1f} s")
    c = preset(a.preset)
    files = lambda folder: sum(f.stat().st_size for f in Path(folder).glob("rank0.onnx*"))  # noqa: E731
    assert read_manifest(art).max_seq >= a.prompt_len + a.new_tokens

    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    fp32 = OrtBackend(art)
    q = OrtBackend(qart)
    fp32_state, q_state = fp32.allocate(1), q.allocate(1)
    prompt = torch.randint(3, c.vocab_size, (1, a.prompt_len), generator=torch.Generator().manual_seed(0))
    ids = prompt[0].tolist()
    dk_round(fp32, fp32_state, ids, 8)  # warm-up all three
    dk_round(q, q_state, ids, 8)
    hf_round(hf, prompt, 8)
    steps: dict[str, list[float]] = {"decodekit_ort_int4": [], "decodekit_ort_fp32": [], "transformers_eager": []}
    tokens: dict[str, list[int]] = {}
    bws: list[float] = []
    for r in range(a.rounds):
        bws.append(cpu_read_bandwidth())
        tokens["decodekit_ort_int4"], s = dk_round(q, q_state, ids, a.new_tokens)
        steps["decodekit_ort_int4"] += s[8:]
        tokens["decodekit_ort_fp32"], s = dk_round(fp32, fp32_state, ids, a.new_tokens)
        steps["decodekit_ort_fp32"] += s[8:]
        tokens["transformers_eager"], s = hf_round(hf, prompt, a.new_tokens)
        steps["transformers_eager"] += s[8:]
        log(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {statistics.median(v):.2f} ms/token"
                                                     for k, v in steps.items()))
    ms = {k: statistics.median(v) for k, v in steps.items()}
    hf_ms = ms["transformers_eager"]
    systems = {k: {"ms_per_token": v, "tokens_per_s": 1e3 / v, "speedup_vs_transformers": hf_ms / v}
               for k, v in ms.items()}
    res = {
        "preset": a.preset, "params": c.num_parameters(), "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
        "rounds": a.rounds, "threads": torch.get_num_threads(), "read_bw_GBps": statistics.median(bws) / 1e9,
        "quantization": {"scheme": qopt.scheme, "accuracy_level": a.accuracy_level, "counts": qcounts,
                         "seconds": quant_s, "file_bytes_fp32": files(art), "file_bytes_quantized": files(qart)},
        "systems": systems,
        "int4_speedup_vs_fp32_ort": ms["decodekit_ort_fp32"] / ms["decodekit_ort_int4"],
        "fp32_greedy_tokens_identical_to_transformers": tokens["decodekit_ort_fp32"] == tokens["transformers_eager"],
        "quantized_greedy_first_divergence_vs_fp32": _first_divergence(tokens["decodekit_ort_int4"],
                                                                       tokens["decodekit_ort_fp32"]),
        "quantized_greedy_token_agreement_vs_fp32": sum(x == y for x, y in zip(tokens["decodekit_ort_int4"],
                                                                                tokens["decodekit_ort_fp32"]))
        / a.new_tokens,
        "versions": {"onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    label = {"decodekit_ort_int4": f"decodekit ORT {qopt.scheme}", "decodekit_ort_fp32": "decodekit ORT fp32",
             "transformers_eager": "transformers eager fp32"}
    print(f"{'system':34} {'ms/token':>9} {'tokens/s':>9} {'vs transformers':>16}")
    for k, v in systems.items():
        print(f"{label[k]:34} {v['ms_per_token']:9.2f} {v['tokens_per_s']:9.1f} {v['speedup_vs_transformers']:15.2f}x")
    print(f"{qopt.scheme} (accuracy_level {a.accuracy_level}): {res['int4_speedup_vs_fp32_ort']:.2f}x the fp32 ORT path; "
          f"rank file {res['quantization']['file_bytes_quantized'] / 1e6:.0f} MB vs "
          f"{res['quantization']['file_bytes_fp32'] / 1e6:.0f} MB; greedy tokens equal to fp32 for the first "
          f"{res['quantized_greedy_first_divergence_vs_fp32']} of {a.new_tokens}; fp32 ORT == transformers: "
          f"{res['fp32_greedy_tokens_identical_to_transformers']}")


if __name__ == "__main__":
    main()
