"""CPU decode of a Phi-4-mini-shaped checkpoint (Phi3ForCausalLM: fused qkv_proj / gate_up_proj, rotary on 96 of
128 dims per head, longrope with its attention factor, tied embeddings; 4 layers at 1024 wide), through
benchmarks/cpu_decode.py: decodekit (export + ort-gqa) against onnxruntime-genai's builder and transformers.

    python benchmarks/phi3_cpu_decode.py --rounds 3 --out results/cpu_phi4-mini-4l_vs_genai.json

--max-seq stays within original_max_position_embeddings (4096), where decodekit's static table and genai's and
transformers' length-switched ones are the short factors alike, so the three greedy outputs can be compared.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cpu_decode
from harness import _word_tokenizer, log

SHAPE = dict(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=131072, original_max_position_embeddings=4096,
             partial_rotary_factor=0.75, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             sliding_window=262144)


def make_phi3(work: Path) -> Path:
    import torch
    import transformers

    out = work / "hf-phi4-mini-4l-fp32"
    if (out / "config.json").exists():
        return out
    gen = torch.Generator().manual_seed(0)
    rotary_half = int(SHAPE["hidden_size"] // SHAPE["num_attention_heads"] * SHAPE["partial_rotary_factor"]) // 2
    short = (1.0 + 0.05 * torch.rand(rotary_half, generator=gen)).tolist()
    long = (1.0 + 20.0 * torch.rand(rotary_half, generator=gen).sort().values).tolist()
    # "type", as the Phi-3 / Phi-4 checkpoints write it (onnxruntime-genai's phi builder reads that key)
    cfg = transformers.Phi3Config(**SHAPE, rope_scaling={"type": "longrope", "short_factor": short,
                                                          "long_factor": long})
    torch.manual_seed(0)
    transformers.Phi3ForCausalLM(cfg).to(torch.float32).save_pretrained(out)
    _word_tokenizer(out, SHAPE["vocab_size"])
    log(f"wrote {out}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--work", default="/tmp/decodekit-phi3-cpu-decode")
    known, rest = ap.parse_known_args()
    work = Path(known.work)
    work.mkdir(parents=True, exist_ok=True)
    cpu_decode.main([*rest, "--work", str(work), "--hf", str(make_phi3(work))])
