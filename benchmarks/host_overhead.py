"""The decode loop's own host work per step (everything but the backend's run: sampler, input advance, token
read, stop checks, the event), on the CPU, preset:tiny, ONNX Runtime CPU.

    python benchmarks/host_overhead.py [--batch 2] [--steps 256] [--rounds 5] [--out results/cpu_host_overhead.json]

Per step: the wall time between successive tokens of runtime.generate minus the time spent inside the backend's
run_decode (timed around the call: on the CPU the run is synchronous). Median over steps per round, median over
rounds. Beside it, the same for the loop with --logprobs and with a sampled config (top-k/top-p, seeded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def measure(backend, prompts, steps: int, sampling) -> dict:
    from decodekit.runtime.generate import generate

    run = backend.run_decode
    inside: list[float] = []

    def timed_run(state):
        t = time.perf_counter()
        out = run(state)
        inside.append(time.perf_counter() - t)
        return out

    backend.run_decode = timed_run
    try:
        state = backend.allocate(len(prompts))
        list(generate(backend, prompts, 8, sampling, eos_ids=(), state=state))  # warm-up
        inside.clear()
        stamps = []
        for _ in generate(backend, prompts, steps, sampling, eos_ids=(), state=state):
            stamps.append(time.perf_counter())
    finally:
        backend.run_decode = run
    walls = [b - a for a, b in zip(stamps, stamps[1:])]
    host = [w - r for w, r in zip(walls, inside)]  # step k's wall time holds the run of step k
    return {"step_us": statistics.median(walls) * 1e6, "run_us": statistics.median(inside) * 1e6,
            "host_us": statistics.median(host) * 1e6}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    from decodekit.export.artifact import ExportOptions, export_artifact
    from decodekit.runtime.ort_backend import OrtBackend
    from decodekit.runtime.sampler import SamplingConfig

    configs = {"greedy (generate default)": SamplingConfig(logprobs=False),
               "greedy --logprobs": SamplingConfig(),
               "sampled top-k/top-p seeded": SamplingConfig(temperature=0.8, top_k=40, top_p=0.9, seed=1)}
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / "tiny"
        export_artifact("preset:tiny", art, ExportOptions(max_seq=a.steps + 32, max_batch=a.batch))
        backend = OrtBackend(art, intra_op_threads=1)
        prompts = [[5 + b, 17, 99, 3, 200, 42, 7, 11][: 8 - b] for b in range(a.batch)]
        results = {name: [] for name in configs}
        for _ in range(a.rounds):
            for name, cfg in configs.items():
                results[name].append(measure(backend, prompts, a.steps, cfg))
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
    for name, s in summary.items():
        print(f"{name:28} host {s['host_us']:7.1f} us/step  (run {s['run_us']:7.1f} us, step {s['step_us']:7.1f} us)")
    if a.out:
        Path(a.out).write_text(json.dumps({"batch": a.batch, "steps": a.steps, "summary": summary,
                                           "rounds": results}, indent=1))


if __name__ == "__main__":
    main()
