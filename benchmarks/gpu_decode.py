"""GPU decode: the loop `decodekit generate` runs against onnxruntime-genai, both built from ONE Hugging Face folder.

    python benchmarks/gpu_decode.py --models llama-3.2-1b --batches 1,8 --steps 128 \
        --out results/h200_llama-3.2-1b_decode_vs_genai.json --plot results/h200_llama-3.2-1b_decode_vs_genai.png

Per model (a random fp16 checkpoint of the preset's shape, made with transformers' own classes), the systems of
the harness's registry (--systems): decodekit (export + `optimize --dialect ort-gqa-static`, the step captured as
one CUDA graph, every token read on the host), decodekit-logprobs (with each token's log-probability),
decodekit-nograph (the same loop uncaptured), genai-graph / genai (onnxruntime-genai's builder -p fp16 -e cuda
and its Generator loop, with and without enable_cuda_graph). Decode ms/step = median over steps 8.. per round,
rounds alternating; the JSON keeps every round. Needs onnxruntime-gpu, onnxruntime-genai-cuda, transformers.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from harness import SYSTEMS, Checkpoint, bar_plot, build_genai, compare_tokens, export_folder, log, random_prompts, \
    run_systems, save_json, study_parser, systems_option


def bench_model(name: str, systems: dict, batches: list[int], steps: int, prompt_len: int, rounds: int,
                work: Path) -> dict:
    import torch

    ck = Checkpoint.make(name, work, "fp16", "cuda", prompt_len + steps + 32, max(batches))
    t = time.perf_counter()
    SYSTEMS["decodekit"].artifact(ck)  # the artifact of every decodekit system here
    dk_s = time.perf_counter() - t
    # only the optimized artifact runs: an 8B std copy would crowd the device's disk
    shutil.rmtree(export_folder(ck), ignore_errors=True)
    _, genai_s = build_genai(ck.hf, work, "fp16", "cuda")
    log(f"{name}: decodekit export+optimize {dk_s:.0f} s, genai builder {genai_s:.0f} s")
    out = {"model": name, "decodekit_build_s": dk_s, "genai_build_s": genai_s, "batches": {}}
    for batch in batches:
        results = run_systems(systems, ck, random_prompts(batch, prompt_len, ck.config.vocab_size, seed=batch),
                              steps, rounds)
        compare_tokens(results, "decodekit")
        res = {s: {**o.to_dict(), "tokens_row0_head": o.tokens[0][:16]} if o.tokens else o.to_dict()
               for s, o in results.items()}
        peers = [res[s]["ms"] for s in ("genai", "genai-graph") if res.get(s, {}).get("ms")]
        ratios = {"ratio_to_best_genai": res["decodekit"]["ms"] / min(peers)} \
            if peers and res.get("decodekit", {}).get("ms") else {}
        out["batches"][str(batch)] = {**ratios, "systems": res}
        torch.cuda.empty_cache()
    return out


def plot(results: list[dict], path: Path) -> None:
    groups = [f"{r['model']} b{b}" for r in results for b in r["batches"]]
    cells = [d["systems"] for r in results for d in r["batches"].values()]
    names = list(dict.fromkeys(s for c in cells for s in c))
    bar_plot(groups, {s: [c.get(s, {}).get("ms") for c in cells] for s in names}, path,
             "decode ms / step (lower is better)", "decode loop vs onnxruntime-genai (one HF checkpoint, fp16)")


def main(argv: list[str] | None = None) -> None:
    ap = study_parser(__doc__, "/tmp/decodekit-gpu-decode", "decodekit,decodekit-logprobs,decodekit-nograph,"
                      "genai-graph,genai", batches="1,8", out_required=True)
    ap.add_argument("--models", default="llama-3.2-1b")
    ap.add_argument("--replot", action="store_true", help="only draw --plot from an existing --out JSON")
    a = ap.parse_args(argv)
    if a.replot:
        plot(json.loads(Path(a.out).read_text())["results"], Path(a.plot))
        return
    import torch

    systems = systems_option(a.systems)
    results = []
    for name in a.models.split(","):
        results.append(bench_model(name, systems, [int(b) for b in a.batches.split(",")], a.steps, a.prompt_len,
                                   a.rounds, Path(a.work)))
        save_json({"device": torch.cuda.get_device_name(), "steps": a.steps, "prompt_len": a.prompt_len,
                   "results": results}, a.out)
    if a.plot:
        plot(results, Path(a.plot))
    for r in results:
        for b, d in r["batches"].items():
            cells = "  ".join(f"{s} {v['ms']:.3f}" if v.get("ms") else f"{s} n/a" for s, v in d["systems"].items())
            ratio = d.get("ratio_to_best_genai")
            print(f"{r['model']} b{b}: {cells}" + (f"  decodekit/best-genai {ratio:.3f}" if ratio else ""))


if __name__ == "__main__":
    main()
