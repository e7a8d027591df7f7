"""CPU decode benchmark: decodekit's ONNX Runtime path beside transformers' eager generate(), one run.

    python -m decodekit.tools.bench_cpu [--preset llama-156m] [--prompt-len 32] [--new-tokens 128] [--out FILE]

The checkpoint is made with transformers' own LlamaForCausalLM (random weights) and saved with
save_pretrained; decodekit exports that folder, so both systems run the very same weights. Greedy decoding;
decode time per token = median of per-step times after warm-up (transformers: timestamps taken by a logits
processor at every step). Roofline: weight bytes read per token / a streaming-read bandwidth measured in
the same run. Rounds alternate between the two systems so background load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from ..export.config import preset
from .benchmarking import cpu_read_bandwidth, kv_bytes, weight_bytes


def log(msg: str) -> None:
    print(f"[bench-cpu] {msg}", file=sys.stderr, flush=True)


def make_checkpoint(name: str, folder: Path, seed: int = 0) -> Path:
    import torch
    import transformers

    if (folder / "config.json").exists():
        return folder
    c = preset(name)
    cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                   intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                                   num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                                   head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
                                   rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, bos_token_id=1,
                                   eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def prepare(name: str, work: Path, prompt_len: int, new_tokens: int) -> tuple[Path, Path]:
    """The transformers-made checkpoint and decodekit's fp32 artifact of it (made once, reused by later runs)."""
    from ..export.artifact import ExportOptions, export_artifact

    ckpt = make_checkpoint(name, work / "hf")
    art = work / "artifact"
    if not (art / "manifest.json").exists():
        export_artifact(str(ckpt), art, ExportOptions(max_seq=prompt_len + new_tokens + 8, max_batch=1,
                                                      logits="last", force=True), progress=log)
    return ckpt, art


def hf_round(model, prompt, new_tokens: int) -> tuple[list[int], list[float]]:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist(), [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]


def dk_round(runner, state, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    from ..runtime.generate import generate

    stamps, tokens = [], []
    for ev in generate(runner, [prompt], new_tokens, eos_ids=(), state=state):
        stamps.append(time.perf_counter())
        tokens.append(int(ev.tokens[0]))
    return tokens, [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="decodekit ORT vs transformers eager generate() on the CPU")
    ap.add_argument("--preset", default="llama-156m")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/decodekit-bench-cpu")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    a = ap.parse_args(argv)

    import torch
    import transformers

    from ..runtime.ort_backend import OrtBackend

    ckpt, art = prepare(a.preset, Path(a.work), a.prompt_len, a.new_tokens)
    c = preset(a.preset)
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    runner = OrtBackend(art)
    state = runner.allocate(1)
    prompt = torch.randint(3, c.vocab_size, (1, a.prompt_len), generator=torch.Generator().manual_seed(0))
    dk_round(runner, state, prompt[0].tolist(), 8)  # warm-up both
    hf_round(hf, prompt, 8)
    dk_steps: list[float] = []
    hf_steps: list[float] = []
    bws: list[float] = []
    rounds: list[dict] = []  # per round: bandwidth and both decode medians, measured back to back
    moved = weight_bytes(c, "fp32") + kv_bytes(c, "fp32", 1, a.prompt_len + a.new_tokens // 2)
    for r in range(a.rounds):
        bws.append(cpu_read_bandwidth())
        dk_tokens, s = dk_round(runner, state, prompt[0].tolist(), a.new_tokens)
        dk_steps += s[8:]
        dk_round_ms = statistics.median(s[8:])
        hf_tokens, s = hf_round(hf, prompt, a.new_tokens)
        hf_steps += s[8:]
        hf_round_ms = statistics.median(s[8:])
        floor = moved / bws[-1] * 1e3
        rounds.append({"read_bw_GBps": bws[-1] / 1e9, "decodekit_ms": dk_round_ms, "transformers_ms": hf_round_ms,
                       "decodekit_roofline": floor / dk_round_ms, "transformers_roofline": floor / hf_round_ms,
                       "speedup": hf_round_ms / dk_round_ms})
        log(f"round {r + 1}/{a.rounds}: decodekit {statistics.median(dk_steps):.2f} ms/token, "
            f"transformers {statistics.median(hf_steps):.2f} ms/token, read bw {bws[-1] / 1e9:.1f} GB/s")
    bw = statistics.median(bws)
    floor_ms = moved / bw * 1e3
    dk_ms, hf_ms = statistics.median(dk_steps), statistics.median(hf_steps)
    res = {
        "preset": a.preset, "params": c.num_parameters(), "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
        "threads": torch.get_num_threads(), "read_bw_GBps": bw / 1e9, "bytes_per_token": moved,
        "roofline_ms": floor_ms,
        "decodekit_ort": {"ms_per_token": dk_ms, "tokens_per_s": 1e3 / dk_ms, "roofline_fraction": floor_ms / dk_ms},
        "transformers_eager": {"ms_per_token": hf_ms, "tokens_per_s": 1e3 / hf_ms,
                               "roofline_fraction": floor_ms / hf_ms},
        "speedup_vs_transformers": hf_ms / dk_ms,
        # a shared VM drifts between rounds: the fraction within each round (bandwidth and decode measured back
        # to back), and its median, are the robust figures
        "rounds": rounds,
        "median_round_roofline": {"decodekit_ort": statistics.median(r["decodekit_roofline"] for r in rounds),
                                  "transformers_eager": statistics.median(r["transformers_roofline"] for r in rounds)},
        "median_round_speedup": statistics.median(r["speedup"] for r in rounds),
        "greedy_tokens_identical": dk_tokens == hf_tokens,
        "versions": {"onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"{'system':22} {'ms/token':>9} {'tokens/s':>9} {'roofline':>9}")
    for k in ("decodekit_ort", "transformers_eager"):
        v = res[k]
        print(f"{k:22} {v['ms_per_token']:9.2f} {v['tokens_per_s']:9.1f} {v['roofline_fraction'] * 100:8.1f}%")
    mr = res["median_round_roofline"]
    print(f"per-round medians: decodekit {mr['decodekit_ort'] * 100:.1f}% / transformers "
          f"{mr['transformers_eager'] * 100:.1f}% of the roofline, speed-up {res['median_round_speedup']:.2f}x")
    print(f"speed-up {res['speedup_vs_transformers']:.2f}x; roofline {floor_ms:.2f} ms/token "
          f"({moved / 1e6:.0f} MB/token at {bw / 1e9:.1f} GB/s); greedy tokens identical: {res['greedy_tokens_identical']}")


if __name__ == "__main__":
    main()
