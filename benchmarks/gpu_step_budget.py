"""Where one captured decode step's time goes: the same artifact replayed back to back (host never reading) as
  ort          the ONNX Runtime run alone, captured
  ort+argmax   the run + argmax + the input advance (the probe of the device-step issue)
  step         decodekit's whole captured step (run + sampler with log-probs + advance + pack)
  loop         the loop `decodekit generate` runs (tokens read on the host one step behind)

    python benchmarks/gpu_step_budget.py ARTIFACT [--batch 1] [--replays 200]

ARTIFACT: an ort-gqa-static artifact (e.g. the one benchmarks/gpu_decode.py builds). Needs onnxruntime-gpu.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def replay_ms(fn, replays: int, stream, inputs, start_pos: int) -> float:
    import torch

    times = []
    for _ in range(5):
        with torch.cuda.stream(stream):  # every round replays the same positions, inside max_seq
            inputs[1:3].fill_(start_pos)
            inputs[3].fill_(start_pos + 1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record()
            for _ in range(replays):
                fn()
            end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--replays", type=int, default=64)
    a = ap.parse_args(argv)
    import torch

    from decodekit.runtime.cuda_graph import CapturedStep
    from decodekit.runtime.decode_step import DecodeStep
    from decodekit.runtime.ort_backend import OrtBackend
    from decodekit.runtime.sampler_torch import argmax_last
    from decodekit.tools.benchmarking import random_prompts, timed_generate

    b = OrtBackend(a.artifact, device="cuda")
    state = b.allocate(a.batch)
    prompts = random_prompts(a.batch, 32, b.vocab)
    out = {}
    timed_generate(b, prompts, 16, state)
    out["loop"] = timed_generate(b, prompts, 128, state).decode_ms()
    step: DecodeStep = next(iter(state.steps.values()))
    out["step"] = replay_ms(step._graph.graph.replay, a.replays, b.stream, state.inputs, 32)
    inputs = state.inputs

    def ort_only():
        return b.run_decode(state)

    def ort_argmax():
        logits = b.run_decode(state)
        inputs[0].copy_(argmax_last(logits[:, 0]))
        inputs[1:].add_(1)

    packed = torch.zeros(2, a.batch, dtype=torch.float64, device=inputs.device)

    def ort_argmax_lsm():  # log-prob from one fused log_softmax (fp32) instead of a float copy + logsumexp
        x = b.run_decode(state)[:, 0]
        tok = argmax_last(x)
        lp = torch.log_softmax(x, -1, dtype=torch.float32).gather(-1, tok[:, None])[:, 0]
        inputs[0].copy_(tok)
        packed[0].copy_(tok)
        packed[1].copy_(lp)
        inputs[1:].add_(1)

    def ort_argmax_f32():  # today's greedy body, written out: float copy, two-stage argmax, logsumexp
        x = b.run_decode(state)[:, 0].float()
        tok = argmax_last(x)
        lp = x.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(x, -1)
        inputs[0].copy_(tok)
        packed[0].copy_(tok)
        packed[1].copy_(lp)
        inputs[1:].add_(1)

    for name, fn in (("ort", ort_only), ("ort+argmax", ort_argmax), ("ort+argmax+log_softmax", ort_argmax_lsm),
                     ("ort+argmax+logsumexp", ort_argmax_f32)):
        with torch.no_grad():
            g = CapturedStep(fn, b.stream, [inputs])
        out[name] = replay_ms(g.graph.replay, a.replays, b.stream, inputs, 32)
    print(json.dumps({k: round(v, 4) for k, v in out.items()}))


if __name__ == "__main__":
    main()
