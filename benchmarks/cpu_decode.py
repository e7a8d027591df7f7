"""CPU decode: systems of the harness's registry on one random checkpoint of a preset's shape, rounds alternating.

    python benchmarks/cpu_decode.py --model llama-156m --systems decodekit,decodekit-1thread,genai,transformers \
        --rounds 3 --out results/cpu_llama-156m_vs_genai.json
    python benchmarks/cpu_decode.py --systems decodekit-std,transformers --rounds 5 --roofline --out results/cpu_llama-156m.json
    python benchmarks/cpu_decode.py --systems decodekit-std-int4-sym-acc4,decodekit-std,transformers --roofline \
        --out results/cpu_quant_llama-156m.json

Batch 1, a --prompt-len prompt, --steps greedy tokens; a system's ms/token in a round = median over steps 8.. of
the time between successive tokens; each system's result is the median over rounds, and ``ratio_to_first`` is the
median of its per-round ratios to the first system listed. Greedy tokens: first divergence from the first system.
--roofline: a streaming-read bandwidth measured before every round, and each system's fraction of the bound
(bytes read per step / bandwidth / its step time) per round. See harness.SYSTEMS for the systems.
--family gemma2|gemma3_text: a Gemma model of the preset's sizes with a sliding window of --window tokens
(`python benchmarks/cpu_decode.py --model llama-156m --family gemma2 --window 64 --rounds 3 --threads 1
--out results/cpu_gemma2-156m_vs_genai.json`).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from harness import Checkpoint, bar_plot, compare_tokens, log, random_prompts, read_bandwidth, run_systems, save_json, \
    study_parser, systems_option


def main(argv: list[str] | None = None) -> None:
    ap = study_parser(__doc__, "/tmp/decodekit-cpu-decode", "decodekit,decodekit-1thread,genai,transformers")
    ap.add_argument("--model", default="llama-156m", help="a preset name: the checkpoint's shape")
    ap.add_argument("--hf", help="a Hugging Face folder to use instead of --model's random one (phi3_cpu_decode.py's)")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads of the torch systems (0: default)")
    ap.add_argument("--roofline", action="store_true", help="measure the read bandwidth before every round")
    ap.add_argument("--family", default="llama", choices=["llama", "gemma2", "gemma3_text"])
    ap.add_argument("--window", type=int, default=None, help="sliding window of the gemma families (tokens)")
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    systems = systems_option(a.systems)
    max_seq = a.prompt_len + a.steps + 32
    ck = (Checkpoint(Path(a.hf), a.dtype, "cpu", Path(a.work), max_seq, 1) if a.hf
          else Checkpoint.make(a.model, Path(a.work), a.dtype, "cpu", max_seq, 1, family=a.family,
                                window=a.window))
    prompts = random_prompts(1, a.prompt_len, ck.config.vocab_size)
    bandwidth: list[float] = []
    out = run_systems(systems, ck, prompts, a.steps, a.rounds,
                      each_round=(lambda r: bandwidth.append(read_bandwidth("cpu"))) if a.roofline else lambda r: None)
    first = next(iter(systems))
    compare_tokens(out, first)
    doc = {"model": a.model, "dtype": a.dtype, "steps": a.steps, "prompt_len": a.prompt_len, "rounds": a.rounds,
           "threads": torch.get_num_threads(), "systems": {}}
    for name, o in out.items():
        row = o.to_dict()
        if o.ms_rounds and out[first].ms_rounds:
            row["ratio_to_first"] = statistics.median(x / f for x, f in zip(o.ms_rounds, out[first].ms_rounds))
        moved = systems[name].step_bytes(ck, 1, a.prompt_len + a.steps // 2)
        if bandwidth and o.ms_rounds and moved:
            row["bytes_per_step"] = moved
            row["roofline_fraction"] = statistics.median(moved / bw * 1e3 / ms for bw, ms in zip(bandwidth, o.ms_rounds))
        doc["systems"][name] = row
    if bandwidth:
        doc["read_bw_GBps_rounds"] = [b / 1e9 for b in bandwidth]
    for name, row in doc["systems"].items():
        if "ms" not in row:
            log(f"{name}: {row['error']}")
            continue
        print(f"{name:30} {row['ms']:8.2f} ms/token  x{row.get('ratio_to_first', 1):.2f} of {first}'s time"
              + (f"  {row['roofline_fraction'] * 100:5.1f}% of the roofline" if "roofline_fraction" in row else "")
              + (f"  tokens = {first}'s for {row[f'first_divergence_from_{first}']} steps"
                 if f"first_divergence_from_{first}" in row else ""))
    if a.out:
        save_json(doc, a.out)
    if a.plot:
        measured = {s: [row.get("ms")] for s, row in doc["systems"].items()}
        bar_plot([f"{a.model} {a.dtype} batch 1"], measured, a.plot, "decode ms / token (lower is better)")


if __name__ == "__main__":
    main()
