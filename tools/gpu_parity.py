"""GPU greedy parity of the ONNX Runtime CUDA dialects against the PyTorch reference, on small models of a real
model's attention shape (fast to export: the question is the attention kernels, not the size).

    python -m decodekit.tools.gpu_parity --like llama-3.1-8b --head-dims 128,64 --batches 1,4

For each head_dim: a 4-layer model with the --like preset's RoPE, GQA group and vocabulary trimmed to 32000,
exported in fp16; per batch, the first step where each artifact's greedy tokens leave the torch reference's
(64 = identical for all 64 steps). Rows: ort-gqa-static with and without a CUDA graph, ort-gqa-uniform
(batch 1; its total_sequence_length is computed on the device), std.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

STEPS = 64


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--like", default="llama-3.1-8b")
    ap.add_argument("--head-dims", default="128,64")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--work", default="/tmp/decodekit-parity")
    a = ap.parse_args(argv)
    import torch

    from ..export import config as C
    from ..export.artifact import ExportOptions, export_artifact
    from ..graphs.pipeline import optimize
    from ..runtime.generate import generate_ids
    from ..runtime.ort_backend import OrtBackend
    from .bench_gpu import prompts_for
    from .bench_torch import TorchDecode, torch_model

    like = C.preset(a.like)
    group = like.num_heads // like.num_kv_heads
    work = Path(a.work)
    for hd in (int(h) for h in a.head_dims.split(",")):
        cfg = dataclasses.replace(like, num_layers=4, hidden_size=1024, intermediate_size=2816, num_heads=2 * group,
                                  num_kv_heads=2, head_dim=hd, vocab_size=32000, bos_token_id=None, eos_token_ids=())
        name = f"parity-{a.like}-hd{hd}"
        C.PRESETS[name] = cfg  # a preset for this process only: export and the reference build the same weights
        std = work / f"{name}-std"
        export_artifact(f"preset:{name}", std, ExportOptions(dtype="fp16", max_seq=STEPS + 64, max_batch=8,
                                                             logits="last", force=True))
        arts = {"std": std}
        for d in ("ort-gqa-static", "ort-gqa-uniform"):
            arts[d] = work / f"{name}-{d}"
            optimize(std, arts[d], d, force=True)
        for batch in (int(b) for b in a.batches.split(",")):
            prompts = prompts_for(batch, 32, cfg.vocab_size)
            ref_dec = TorchDecode(torch_model(cfg, "fp16", STEPS + 64), batch, STEPS + 64)
            first = ref_dec.prefill(torch.tensor(prompts, device="cuda"))
            toks, _ = ref_dec.decode(first, STEPS - 1)
            ref = [[int(first[b])] + [t[b] for t in toks] for b in range(batch)]
            del ref_dec
            for d, graph in (("ort-gqa-static", True), ("ort-gqa-static", False), ("ort-gqa-uniform", False),
                             ("std", False)):
                if d == "ort-gqa-uniform" and batch > 1:
                    continue
                with OrtBackend(arts[d], device="cuda", cuda_graph=graph) as runner:
                    got = generate_ids(runner, prompts, STEPS, eos_ids=())
                div = min(next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), STEPS) for g, r in zip(got, ref))
                print(f"head_dim {hd} batch {batch} {d:16} graph={graph!s:5}: first divergence from torch {div}",
                      flush=True)


if __name__ == "__main__":
    main()
