"""GPU decode: the loop `decodekit generate` runs against onnxruntime-genai, both built from ONE Hugging Face folder.

    python benchmarks/gpu_decode.py --models llama-3.2-1b --batches 1,8 --steps 128 \
        --out results/h200_decode_vs_genai.json --plot results/h200_decode_vs_genai.png

Per model (a random checkpoint of the preset's shape, made with transformers' LlamaForCausalLM, fp16):
  decodekit            `decodekit export HF -o A --dtype fp16` + `optimize A --dialect ort-gqa-static`, run by
                       runtime.generate (tokens streamed to the host every step) as `decodekit generate` runs it
                       (no --logprobs): the decode step captured as one CUDA graph (ORT run + sampler + input
                       advance); `:logprobs` with each token's log-probability, `:eager` the same loop uncaptured
  genai[:graph]        onnxruntime-genai's model builder (-p fp16 -e cuda) on the same folder, its Generator loop
                       reading every token on the host (get_next_tokens), with and without enable_cuda_graph
Decode ms/step = median over steps 8.. of the wall time between successive tokens, per round; rounds alternate
systems; the JSON keeps every round. Greedy tokens: decodekit captured vs eager (must be identical) and the
first divergence from genai (fp16 near-ties of random weights may part them). Needs onnxruntime-gpu,
onnxruntime-genai-cuda, transformers and a CUDA GPU (see ../shared/gpu/README.md for the staging).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from harness import Decodekit, Genai, build_genai, first_divergence, genai_folder, log, make_hf


def build_decodekit(hf: Path, work: Path, max_seq: int) -> tuple[Path, float]:
    from decodekit.export.artifact import ExportOptions, export_artifact
    from decodekit.graphs.pipeline import optimize

    std, static = work / f"{hf.name}-std", work / f"{hf.name}-ort-gqa-static"
    t = time.perf_counter()
    if not (static / "manifest.json").exists():
        export_artifact(str(hf), std, ExportOptions(dtype="fp16", max_seq=max_seq, max_batch=8, logits="last",
                                                    force=True), progress=log)
        optimize(std, static, "ort-gqa-static", force=True)
        shutil.rmtree(std)  # only the optimized artifact runs; an 8B std copy would crowd the device's disk
    return static, time.perf_counter() - t


def bench_model(name: str, batches: list[int], steps: int, prompt_len: int, rounds: int, work: Path) -> dict:
    import torch

    max_seq = prompt_len + steps + 32
    hf = make_hf(name, work)
    static, dk_s = build_decodekit(hf, work, max_seq)
    genai, genai_s = build_genai(hf, work, "fp16", "cuda")
    log(f"{name}: decodekit export+optimize {dk_s:.0f} s, genai builder {genai_s:.0f} s")
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    out = {"model": name, "decodekit_build_s": dk_s, "genai_build_s": genai_s, "batches": {}}
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, vocab, (batch, prompt_len), generator=g).tolist()
        systems = {"decodekit": lambda: Decodekit(static, True, batch, logprobs=False),
                   "decodekit:logprobs": lambda: Decodekit(static, True, batch),
                   "decodekit:eager": lambda: Decodekit(static, False, batch, logprobs=False),
                   "genai:graph": lambda: Genai(genai_folder(genai, batch, prompt_len + steps, True)),
                   "genai": lambda: Genai(genai_folder(genai, batch, prompt_len + steps, False))}
        runners, res = {}, {}
        for s, make in systems.items():
            try:
                runners[s] = make()
                runners[s].run(prompts, 16)  # warm-up (+ capture)
                res[s] = {"ms_rounds": [], "tokens": None}
            except Exception as e:  # noqa: BLE001 - a system that cannot run is recorded, not fatal
                res[s] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                runners.pop(s, None)
                log(f"b{batch} {s}: {res[s]['error']}")
        for r in range(rounds):
            for s, runner in runners.items():
                try:
                    times, tokens = runner.run(prompts, steps)
                except Exception as e:  # noqa: BLE001
                    res[s] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                    continue
                res[s]["ms_rounds"].append(statistics.median(times[8:]))
                res[s]["tokens"] = tokens
                log(f"{name} b{batch} round {r} {s}: {res[s]['ms_rounds'][-1]:.3f} ms/step")
        for s, v in res.items():
            if "ms_rounds" in v and v["ms_rounds"]:
                v["ms"] = statistics.median(v["ms_rounds"])
        dk = res.get("decodekit", {})
        if dk.get("tokens"):
            for s in ("decodekit:logprobs", "decodekit:eager", "genai", "genai:graph"):
                if res.get(s, {}).get("tokens"):
                    res[s]["first_divergence_from_decodekit"] = first_divergence(dk["tokens"], res[s]["tokens"])
        peers = [res[s]["ms"] for s in ("genai", "genai:graph") if "ms" in res.get(s, {})]
        if "ms" in dk and peers:
            out_b = {"ratio_to_best_genai": dk["ms"] / min(peers)}
            if "ms" in res.get("genai:graph", {}):
                out_b["ratio_to_genai_graph"] = dk["ms"] / res["genai:graph"]["ms"]
        else:
            out_b = {}
        for v in res.values():
            tokens = v.pop("tokens", None)
            if tokens:
                v["tokens_row0_head"] = tokens[0][:16]
        out["batches"][str(batch)] = {**out_b, "systems": res}
        del runners
        torch.cuda.empty_cache()
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{r['model']} b{b}", s, v["ms"]) for r in results for b, d in r["batches"].items()
            for s, v in d["systems"].items() if "ms" in v]
    groups = sorted({g for g, _, _ in rows}, key=lambda g: [x for x, _, _ in rows].index(g))
    systems = ["decodekit", "decodekit:logprobs", "decodekit:eager", "genai:graph", "genai"]
    fig, ax = plt.subplots(figsize=(4 + 2.2 * len(groups), 4))
    w = 0.8 / len(systems)
    for i, s in enumerate(systems):
        xs = [k + i * w for k, g in enumerate(groups) if any(r[0] == g and r[1] == s for r in rows)]
        ys = [next(r[2] for r in rows if r[0] == g and r[1] == s) for g in groups
              if any(r[0] == g and r[1] == s for r in rows)]
        ax.bar(xs, ys, w, label=s)
    ax.set_xticks([k + 0.4 - w / 2 for k in range(len(groups))], groups)
    ax.set_ylabel("decode ms / step (lower is better)")
    ax.set_title("decode loop vs onnxruntime-genai (one HF checkpoint, fp16)", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama-3.2-1b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/decodekit-gpu-decode")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot")
    ap.add_argument("--replot", action="store_true", help="only draw --plot from an existing --out JSON")
    a = ap.parse_args(argv)
    if a.replot:
        plot(json.loads(Path(a.out).read_text())["results"], Path(a.plot))
        return
    import torch

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in a.models.split(","):
        results.append(bench_model(name, [int(b) for b in a.batches.split(",")], a.steps, a.prompt_len, a.rounds,
                                   work))
        doc = {"device": torch.cuda.get_device_name(), "steps": a.steps, "prompt_len": a.prompt_len,
               "results": results}
        Path(a.out).write_text(json.dumps(doc, indent=1))
    if a.plot:
        plot(results, Path(a.plot))
    for r in results:
        for b, d in r["batches"].items():
            cells = "  ".join(f"{s} {v['ms']:.3f}" if "ms" in v else f"{s} n/a" for s, v in d["systems"].items())
            ratio = d.get("ratio_to_best_genai")
            print(f"{r['model']} b{b}: {cells}  decodekit/best-genai {ratio:.3f}" if ratio else f"{r['model']} b{b}: {cells}")


if __name__ == "__main__":
    main()
