"""GPU greedy parity of the ONNX Runtime CUDA dialects against the PyTorch reference, on small models with a real
model's attention shape (fast to export: the question is the attention kernels, not the size). The check itself is
`decodekit validate --mode parity`; this study makes the models and runs it per dialect and batch.

    python benchmarks/gpu_parity.py --like llama-3.1-8b --head-dims 128,64 --batches 1,4 [--out parity.json]

Per head_dim: a 4-layer fp16 checkpoint with the --like preset's RoPE and GQA group (hidden 1024, vocabulary 32000;
--layers / --hidden / --vocab make it smaller, e.g. for a CPU run with --device cpu), made with
transformers' own classes and exported; per batch (--prompt-len 32-token prompts, --steps greedy steps) every artifact's
free-running greedy tokens against the torch backend's on the GPU: ort-gqa-static with and without its CUDA graph,
ort-gqa-uniform (batch 1: its total_sequence_length is computed on the device), std. The first divergence is
reported (--steps = identical throughout).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from harness import Checkpoint, log, random_prompts, save_json, study_parser

DIALECTS = {  # label -> (dialect, ort backend options, largest batch it is checked at)
    "ort-gqa-static": ("ort-gqa-static", (), None),
    "ort-gqa-static nograph": ("ort-gqa-static", (("cuda_graph", False),), None),
    "ort-gqa-uniform": ("ort-gqa-uniform", (), 1),
    "std": ("std", (), None),
}


def main(argv: list[str] | None = None) -> None:
    ap = study_parser(__doc__, "/tmp/decodekit-parity", steps=64, batches="1,4")
    ap.add_argument("--like", default="llama-3.1-8b")
    ap.add_argument("--head-dims", default="128,64")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size (intermediate: 2.75x)")
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args(argv)
    from decodekit.export.artifact import ExportOptions, export_artifact
    from decodekit.export.config import preset
    from decodekit.graphs.pipeline import optimize
    from decodekit.tools.validate import BackendSpec, validate

    like = preset(a.like)
    group = like.num_heads // like.num_kv_heads
    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    for hd in (int(h) for h in a.head_dims.split(",")):
        cfg = dataclasses.replace(like, num_layers=a.layers, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                                  num_heads=2 * group, num_kv_heads=2, head_dim=hd, vocab_size=a.vocab,
                                  bos_token_id=None, eos_token_ids=())
        name = f"parity-{a.like}-hd{hd}-L{a.layers}-h{a.hidden}-v{a.vocab}"
        ck = Checkpoint.make(name, Path(a.work), "fp16", a.device, a.prompt_len + a.steps + 32, max(batches),
                             config=cfg)
        std = ck.work / f"{ck.hf.name}-std"
        if not (std / "manifest.json").exists():
            export_artifact(str(ck.hf), std, ExportOptions(dtype="fp16", max_seq=ck.max_seq, max_batch=ck.max_batch,
                                                           logits="last", force=True), progress=log)
        arts = {"std": std}
        for d in {d for d, _, _ in DIALECTS.values()} - {"std"}:
            arts[d] = ck.work / f"{ck.hf.name}-{d}"
            if not (arts[d] / "manifest.json").exists():
                optimize(std, arts[d], d, force=True)
        for batch in batches:
            specs = [BackendSpec("torch")] + [
                BackendSpec("ort", str(arts[d]), options, alias=label)
                for label, (d, options, most) in DIALECTS.items() if most is None or batch <= most]
            report = validate(std, specs, random_prompts(batch, a.prompt_len, cfg.vocab_size), a.steps - 1, device=a.device,
                              mode="parity", bisect=False, progress=log)
            for c in report.comparisons:
                first = c.greedy.first_divergence
                rows.append({"head_dim": hd, "batch": batch, "system": c.backend, "identical": c.greedy.match,
                             "first_divergence": a.steps if first is None else first[1]})
                print(f"head_dim {hd} batch {batch} {c.backend:24}: first divergence from torch "
                      f"{rows[-1]['first_divergence']}", flush=True)
    if a.out:
        save_json({"like": a.like, "steps": a.steps, "rows": rows}, a.out)


if __name__ == "__main__":
    main()
