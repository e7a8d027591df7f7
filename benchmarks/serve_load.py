"""Continuous batching (runtime/scheduler.py) against fixed batches (runtime.generate), same requests, closed loop.

    python benchmarks/serve_load.py --threads 1 --rounds 3 \
        --out results/cpu_serve_load_tiny.json --plot results/cpu_serve_load_tiny.png
    python benchmarks/serve_load.py --device cuda --model llama-3.2-1b --rounds 3 \
        --out results/h200_serve_load_llama-3.2-1b.json --plot results/h200_serve_load_llama-3.2-1b.png

C clients each send their next request when the previous one is answered. Requests have random prompt lengths
(8..64 tokens; all 36 tokens on an artifact without ``mixed_lengths``, e.g. ort-gqa-static, whose fixed batches
need equal lengths) and random output lengths (8..96 tokens, greedy, no EOS), the same list for both systems.

- continuous: one Scheduler with C slots (made once per level, so a captured CUDA graph is reused by every round);
  each client submits and waits for its answer.
- fixed: the requests in groups of C, each group one ``generate`` call run until its longest request is done
  (what a server without continuous batching does); a group starts when the previous one ends.

Output tokens/s = requested output tokens / wall time; time to first token = from a request's arrival (its
client's previous answer) to its first token. Each level runs ``--rounds`` rounds alternating the two modes
(continuous first), after one unmeasured warm-up of each; the JSON keeps every round and the medians. Tokens:
how many requests got the same greedy tokens from both modes (fp32: all; fp16 on a GPU, near-ties of random
weights can differ between batch shapes).

Models: on the CPU a decodekit preset exported fp32 (std dialect); with ``--device cuda`` a random fp16
Hugging Face checkpoint of the preset's shape (benchmarks/harness.Checkpoint), exported fp16 and optimized to
``ort-gqa-static``, whose decode step is captured as one CUDA graph (needs onnxruntime-gpu and a CUDA GPU).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path

from harness import Checkpoint, log

EQUAL_PROMPT = 36  # prompt length for artifacts whose batches need equal lengths


def workload(n: int, seed: int, vocab: int, equal: bool = False) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(EQUAL_PROMPT if equal else rng.randint(8, 64))],
             rng.randint(8, 96)) for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_continuous(sched, reqs, clients: int) -> tuple[dict, list[list[int]]]:
    from decodekit.runtime.request import Request
    from decodekit.runtime.sampler import SamplingConfig

    greedy = SamplingConfig(logprobs=False)
    ttft: list[float] = []
    tokens: list[list[int]] = [[] for _ in reqs]
    next_i = iter(range(len(reqs)))
    lock = threading.Lock()
    steps, runs = sched.steps, sched.side.runs

    def client() -> None:
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            prompt, n = reqs[i]
            r = sched.submit(Request(tuple(prompt), n, greedy, eos_ids=())).result()
            assert len(r.token_ids) == n, (len(r.token_ids), n, r.finish_reason, r.error)
            tokens[i] = r.token_ids
            with lock:
                ttft.append(r.first_token_s)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    extra = {"engine_steps": sched.steps - steps, "prefill_runs": sched.side.runs - runs}
    return summary(sum(n for _, n in reqs), wall, ttft) | extra, tokens


def run_fixed(backend, state, reqs, clients: int) -> tuple[dict, list[list[int]]]:
    from decodekit.runtime.generate import generate
    from decodekit.runtime.sampler import SamplingConfig

    greedy = SamplingConfig(logprobs=False)
    ttft: list[float] = []
    steps: list[list] = []  # per group, each step's [B] tokens (read after the clock stops)
    t0 = time.perf_counter()
    for g in range(0, len(reqs), clients):
        group = reqs[g:g + clients]
        start = time.perf_counter()
        st = state if len(group) == clients else None
        first = None
        steps.append([])
        for ev in generate(backend, [p for p, _ in group], max(n for _, n in group), greedy, eos_ids=(), state=st):
            if first is None:
                first = time.perf_counter() - start
            steps[-1].append(ev.tokens)
        ttft += [first] * len(group)
    wall = time.perf_counter() - t0
    tokens = [[int(s[b]) for s in group_steps[:n]] for g, group_steps in zip(range(0, len(reqs), clients), steps)
              for b, (_, n) in enumerate(reqs[g:g + clients])]
    return summary(sum(n for _, n in reqs), wall, ttft), tokens


def summary(tokens: int, wall: float, ttft: list[float]) -> dict:
    return {"output_tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1e3 * pct(ttft, 0.5), 2), "ttft_p99_ms": round(1e3 * pct(ttft, 0.99), 2),
            "ttft_mean_ms": round(1e3 * statistics.fmean(ttft), 2)}


def run_level(backend, reqs, clients: int, rounds: int, serving=None, rows_per_prefill: int = 0) -> dict:
    """Both modes at one concurrency, alternating, after one warm-up of each (capture, first runs). ``serving``:
    the backend the scheduler runs on, as `decodekit serve` opens it (default: ``backend``)."""
    from decodekit.runtime.scheduler import Scheduler, SchedulerConfig

    state = backend.allocate(clients)
    warm = reqs[:clients]
    rows: dict[str, list[dict]] = {"continuous": [], "fixed": []}
    cfg = SchedulerConfig(slots=clients, max_queue=clients, rows_per_prefill=rows_per_prefill)
    with Scheduler(serving or backend, cfg) as sched:
        run_continuous(sched, warm, clients)
        run_fixed(backend, state, warm, clients)
        for r in range(rounds):
            c, c_tokens = run_continuous(sched, reqs, clients)
            f, f_tokens = run_fixed(backend, state, reqs, clients)
            rows["continuous"].append(c)
            rows["fixed"].append(f)
            log(f"{clients:3d} clients, round {r}: continuous {c['tokens_per_s']:8.1f} tok/s TTFT p50 "
                f"{c['ttft_p50_ms']:7.2f} ms | fixed {f['tokens_per_s']:8.1f} tok/s TTFT p50 {f['ttft_p50_ms']:7.2f} ms")
    same = sum(a == b for a, b in zip(c_tokens, f_tokens))
    level = {mode: median_row(rs) | {"rounds": rs} for mode, rs in rows.items()}
    level["identical_requests"] = f"{same}/{len(reqs)}"
    level["continuous_over_fixed"] = round(level["continuous"]["tokens_per_s"] / level["fixed"]["tokens_per_s"], 3)
    return level


def median_row(rows: list[dict]) -> dict:
    keys = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "ttft_mean_ms")
    return {k: round(statistics.median(r[k] for r in rows), 2) for k in keys}


def build(args) -> Path:
    """The artifact: --artifact as given, else the preset exported (CPU: fp32 std; CUDA: fp16 ort-gqa-static)."""
    from decodekit.export.artifact import ExportOptions, export_artifact
    from decodekit.graphs.pipeline import optimize

    if args.artifact is not None:
        return args.artifact
    batch = max(args.clients)
    if args.device == "cpu":
        out = args.work / f"{args.model}-b{batch}"
        if not (out / "manifest.json").exists():
            log(f"exporting preset:{args.model} with max_batch {batch}")
            export_artifact(f"preset:{args.model}", out, ExportOptions(max_batch=batch, max_seq=256, force=True))
        return out
    std, static = args.work / f"{args.model}-fp16-b{batch}-std", args.work / f"{args.model}-fp16-b{batch}-ort-gqa-static"
    if not (static / "manifest.json").exists():
        t = time.perf_counter()
        hf = Checkpoint.make(args.model, args.work, "fp16", "cuda", 256, batch).hf
        export_artifact(str(hf), std, ExportOptions(dtype="fp16", max_batch=batch, max_seq=256, logits="last",
                                                    force=True), progress=log)
        optimize(std, static, "ort-gqa-static", force=True)
        log(f"{args.model}: checkpoint + export + optimize {time.perf_counter() - t:.0f} s")
    return static


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [int(c) for c in doc["levels"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, color in (("continuous", "tab:blue"), ("fixed", "tab:orange")):
        rows = [doc["levels"][str(c)][mode] for c in cs]
        a.plot(cs, [r["tokens_per_s"] for r in rows], "o-", color=color, label=mode)
        b.plot(cs, [r["ttft_p50_ms"] for r in rows], "o-", color=color, label=f"{mode} p50")
        b.plot(cs, [r["ttft_p99_ms"] for r in rows], "s--", color=color, label=f"{mode} p99")
    for ax, title in ((a, "output tokens/s (median of rounds)"), (b, "time to first token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend()
    b.set_yscale("log")
    fig.suptitle(f"decodekit serve scheduler vs fixed batches: {doc['model']} {doc['dtype']} {doc['dialect']} on "
                 f"{doc['device']}, {doc['requests']} requests x {doc['rounds']} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="a decodekit preset (tiny, llama-156m, llama-3.2-1b, ...)")
    ap.add_argument("--artifact", type=Path, default=None, help="an exported artifact (default: build the preset)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/decodekit-serve-load"))
    ap.add_argument("--clients", default="1,4,16,64", type=lambda s: [int(c) for c in s.split(",")])
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="CPU: onnxruntime intra-op threads (0 = default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows-per-prefill", type=int, default=0,
                    help="SchedulerConfig.rows_per_prefill (0: prefill each new prompt at once)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from decodekit.runtime.ort_backend import OrtBackend

    torch.set_num_threads(1)  # per-row sampling on small rows: one thread (see runtime/decode_step.py)
    t0 = time.perf_counter()
    artifact = build(args)
    options = {"intra_op_threads": args.threads} if args.device == "cpu" else {}
    backend = OrtBackend(artifact, device=args.device, **options)  # fixed batches: as `decodekit generate` runs
    # continuous: as `decodekit serve` runs (on CUDA a session of its own, its shared step captured as one graph)
    serving = OrtBackend(artifact, device="cuda") if args.device == "cuda" else backend
    m = backend.manifest
    reqs = workload(args.requests, args.seed, m.config.vocab_size, equal=not m.allows("mixed_lengths"))
    doc = {"model": args.model, "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
           "dtype": m.dtype, "dialect": m.dialect, "cuda_graph": {"fixed": backend.cuda_graph, "continuous": serving.cuda_graph},
           "requests": args.requests, "rounds": args.rounds, "clients": args.clients,
           "rows_per_prefill": args.rows_per_prefill,
           "workload": (f"prompt {EQUAL_PROMPT} tokens" if not m.allows("mixed_lengths") else "prompt 8..64 tokens")
           + ", output 8..96 tokens, greedy, no EOS", "levels": {}}
    for c in args.clients:
        doc["levels"][str(c)] = run_level(backend, reqs, c, args.rounds, serving, args.rows_per_prefill)
        level = doc["levels"][str(c)]
        log(f"{c:3d} clients: continuous/fixed tokens/s {level['continuous_over_fixed']}x, TTFT p50 "
            f"{level['continuous']['ttft_p50_ms']} / {level['fixed']['ttft_p50_ms']} ms, same tokens "
            f"{level['identical_requests']}")
    backend.close()
    if serving is not backend:
        serving.close()
    doc["total_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.plot:
        plot(doc, args.plot)


if __name__ == "__main__":
    main()
