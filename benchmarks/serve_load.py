"""Continuous batching (runtime/scheduler.py) against fixed batches (runtime.generate), same requests, closed loop.

    python benchmarks/serve_load.py --model tiny --clients 1,4,16,64 --requests 128 \
        --out results/cpu_serve_load_tiny.json --plot results/cpu_serve_load_tiny.png

C clients each send their next request when the previous one is answered. Requests have random prompt lengths
(8..64 tokens) and random output lengths (8..96 tokens, greedy, no EOS), the same list for both systems.

- continuous: one Scheduler with C slots; each client submits and reads its stream.
- fixed: the requests in groups of C, each group one ``generate`` call run until its longest request is done
  (what a server without continuous batching does); a group starts when the previous one ends.

Output tokens/s = requested output tokens / wall time; time to first token = from a request's arrival (its
client's previous answer) to its first token. `--device cuda` runs the ORT CUDA EP (same code).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path

from harness import log


def workload(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(8, 64))], rng.randint(8, 96)) for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_continuous(backend, reqs, clients: int) -> dict:
    from decodekit.runtime.request import Request
    from decodekit.runtime.sampler import SamplingConfig
    from decodekit.runtime.scheduler import Scheduler, SchedulerConfig

    greedy = SamplingConfig(logprobs=False)
    ttft: list[float] = []
    next_i = iter(range(len(reqs)))
    lock = threading.Lock()
    with Scheduler(backend, SchedulerConfig(slots=clients, max_queue=clients)) as sched:
        def client() -> None:
            while True:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    return
                prompt, n = reqs[i]
                r = sched.submit(Request(tuple(prompt), n, greedy, eos_ids=())).result()
                assert len(r.token_ids) == n, (len(r.token_ids), n, r.finish_reason)
                with lock:
                    ttft.append(r.first_token_s)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        steps = sched.steps
    return summary(sum(n for _, n in reqs), wall, ttft) | {"engine_steps": steps}


def run_fixed(backend, reqs, clients: int) -> dict:
    from decodekit.runtime.generate import generate
    from decodekit.runtime.sampler import SamplingConfig

    greedy = SamplingConfig(logprobs=False)
    state = backend.allocate(clients)
    ttft: list[float] = []
    t0 = time.perf_counter()
    for g in range(0, len(reqs), clients):
        group = reqs[g:g + clients]
        start = time.perf_counter()
        st = state if len(group) == clients else None
        first = None
        for ev in generate(backend, [p for p, _ in group], max(n for _, n in group), greedy, eos_ids=(), state=st):
            if first is None:
                first = time.perf_counter() - start
        ttft += [first] * len(group)
    wall = time.perf_counter() - t0
    return summary(sum(n for _, n in reqs), wall, ttft)


def summary(tokens: int, wall: float, ttft: list[float]) -> dict:
    return {"output_tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1e3 * pct(ttft, 0.5), 2), "ttft_p99_ms": round(1e3 * pct(ttft, 0.99), 2),
            "ttft_mean_ms": round(1e3 * statistics.fmean(ttft), 2)}


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
    for ax, title in ((a, "output tokens/s"), (b, "time to first token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend()
    b.set_yscale("log")
    fig.suptitle(f"decodekit serve scheduler vs fixed batches: {doc['model']} on {doc['device']}, "
                 f"{doc['requests']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="a decodekit preset (tiny, llama-156m, ...)")
    ap.add_argument("--artifact", type=Path, default=None, help="an exported artifact (default: export the preset)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/decodekit-serve-load"))
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from decodekit.export.artifact import ExportOptions, export_artifact
    from decodekit.runtime.ort_backend import OrtBackend

    torch.set_num_threads(1)  # per-row sampling on small rows: one thread (see runtime/decode_step.py)
    clients = [int(c) for c in args.clients.split(",")]
    artifact = args.artifact
    if artifact is None:
        artifact = args.work / f"{args.model}-b{max(clients)}"
        if not (artifact / "manifest.json").exists():
            log(f"exporting preset:{args.model} with max_batch {max(clients)}")
            export_artifact(f"preset:{args.model}", artifact, ExportOptions(max_batch=max(clients), max_seq=256))
    backend = OrtBackend(artifact, device=args.device, intra_op_threads=args.threads)
    reqs = workload(args.requests, args.seed, backend.manifest.config.vocab_size)
    run_fixed(backend, reqs[:4], 2)  # warm-up
    doc = {"model": args.model, "device": args.device, "requests": args.requests, "clients": clients,
           "workload": "prompt 8..64, output 8..96 tokens, greedy, no EOS", "levels": {}}
    for c in clients:
        doc["levels"][str(c)] = {"continuous": run_continuous(backend, reqs, c), "fixed": run_fixed(backend, reqs, c)}
        log(f"{c:3d} clients: {json.dumps(doc['levels'][str(c)])}")
    backend.close()
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.plot:
        plot(doc, args.plot)


if __name__ == "__main__":
    main()
