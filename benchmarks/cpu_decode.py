"""CPU decode: what a user gets by following the README (export, then `optimize --dialect ort-gqa`, then the loop
`decodekit generate` runs) against onnxruntime-genai's fp32 CPU build and transformers, one checkpoint.

    python benchmarks/cpu_decode.py --model llama-156m --rounds 5 \
        --out results/cpu_llama-156m_vs_genai.json

    python benchmarks/cpu_decode.py --model llama-156m --family gemma2 --window 64 --rounds 3 \
        --out results/cpu_gemma2-156m_vs_genai.json

The checkpoint is a random fp32 LlamaForCausalLM of the preset's shape (or, with --family, a Gemma 2 / Gemma 3
model of its sizes with a sliding window of --window tokens). 32-token prompt, 128 greedy tokens,
batch 1; ms/token = median over steps 8.. of the time between successive tokens; rounds alternate the systems
and the result is the median over rounds of each system's ms and of the per-round ratios. Greedy tokens are
compared (first divergence from decodekit's). `decodekit:1thread` is the same with one ONNX Runtime intra-op
thread: on a busy 2-core machine ORT's default (one thread per core) ran 1.8x slower than one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from harness import Decodekit, Genai, build_genai, first_divergence, genai_folder, log, make_hf


class Transformers:
    def __init__(self, hf: Path) -> None:
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()

    def run(self, prompts: list[list[int]], steps: int) -> tuple[list[float], list[list[int]]]:
        import torch
        import transformers

        stamps: list[float] = []

        class Stamp(transformers.LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                      min_new_tokens=steps, do_sample=False, pad_token_id=0,
                                      logits_processor=[Stamp()])
        return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])], out[:, ids.shape[1]:].tolist()


def build_decodekit(hf: Path, work: Path, max_seq: int) -> tuple[Path, float]:
    from decodekit.export.artifact import ExportOptions, export_artifact
    from decodekit.graphs.pipeline import optimize

    std, gqa = work / f"{hf.name}-std", work / f"{hf.name}-ort-gqa"
    t = time.perf_counter()
    if not (gqa / "manifest.json").exists():
        export_artifact(str(hf), std, ExportOptions(max_seq=max_seq, max_batch=1, force=True), progress=log)
        optimize(std, gqa, "ort-gqa", force=True)
    return gqa, time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-156m")
    ap.add_argument("--family", default="llama", choices=["llama", "gemma2", "gemma3_text"])
    ap.add_argument("--window", type=int, default=None, help="sliding window of the gemma families (tokens)")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="decodekit ORT intra-op threads (0 = ORT default, as genai)")
    ap.add_argument("--work", default="/tmp/decodekit-cpu-decode")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    hf = make_hf(a.model, work, "fp32", "cpu", a.family, a.window)
    art, dk_s = build_decodekit(hf, work, a.prompt_len + a.steps + 32)
    genai, genai_s = build_genai(hf, work, "fp32", "cpu")
    log(f"decodekit export+optimize {dk_s:.0f} s, genai builder {genai_s:.0f} s")
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    prompts = torch.randint(3, vocab, (1, a.prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    systems = {"decodekit": Decodekit(art, None, 1, logprobs=False, device="cpu", threads=a.threads),
               "decodekit:1thread": Decodekit(art, None, 1, logprobs=False, device="cpu", threads=1),
               "genai": Genai(genai_folder(genai, 1, a.prompt_len + a.steps, None)),
               "transformers": Transformers(hf)}
    rounds: dict[str, list[float]] = {s: [] for s in systems}
    tokens: dict[str, list[list[int]]] = {}
    for s, r in systems.items():  # warm-up (genai sizes a windowed layer's cache by the run: at least the window)
        r.run(prompts, max(8, a.window or 0))
    for k in range(a.rounds):
        for s, r in systems.items():
            times, tokens[s] = r.run(prompts, a.steps)
            rounds[s].append(statistics.median(times[8:]))
            log(f"round {k} {s}: {rounds[s][-1]:.2f} ms/token")
    ratios = {s: statistics.median(o / d for o, d in zip(rounds[s], rounds["decodekit"])) for s in systems}
    doc = {"model": a.model, "family": a.family, "window": a.window, "threads": a.threads, "steps": a.steps, "prompt_len": a.prompt_len,
           "decodekit_build_s": dk_s, "genai_build_s": genai_s,
           "systems": {s: {"ms_per_token": statistics.median(v), "rounds": v,
                           "speedup_of_decodekit": ratios[s],
                           "first_divergence_from_decodekit": first_divergence(tokens["decodekit"], tokens[s])}
                       for s, v in rounds.items()}}
    for s, v in doc["systems"].items():
        print(f"{s:18} {v['ms_per_token']:7.2f} ms/token  {v['speedup_of_decodekit']:.2f}x decodekit's time "
              f"(median of per-round ratios)  tokens identical to decodekit's for "
              f"{v['first_divergence_from_decodekit']} steps")
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
