"""Is a greedy divergence between ONNX Runtime and PyTorch on the GPU an error or a near-tie? Teacher-forced
logits of both fp16 systems against an fp32 judge, on a full-size preset model with random weights.

    python -m decodekit.tools.gpu_teacher_forced --model llama-3.1-8b --artifact WORK/llama-3.1-8b-fp16-ort-gqa-static

1. The PyTorch reference (our Decoder, fp16, eager) decodes --steps greedy tokens after a random prompt.
2. Along that exact sequence (teacher forcing) the logits of every predicted position come from
   - ORT: the artifact through the ort backend on CUDA (runtime.generate's path: IOBinding, CUDA graph where
     the dialect allows it), one decode step per position,
   - torch fp16: one forward over the whole sequence,
   - the judge: the same fp16 weights upcast to fp32, one forward.
3. Per system against the judge: argmax agreement, max / mean |logit error|, relative L2 error. At every position
   where ORT's and torch's argmax differ: the judge's top-2 margin, and which token each system and the judge pick.
   A margin below both systems' logit error there is a near-tie that fp16 rounding decides either way.
Also: ORT's free-running greedy tokens through runtime.generate against the reference's (first divergence).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a preset name (random weights, seed 0 as the export)")
    ap.add_argument("--artifact", required=True, help="an fp16 export of --model (any dialect the GPU runs)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    a = ap.parse_args(argv)
    report = teacher_forced(a.model, Path(a.artifact), a.steps, a.prompt_len)
    text = json.dumps(report, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


def teacher_forced(name: str, artifact: Path, steps: int, prompt_len: int) -> dict:
    import numpy as np
    import torch

    from ..export.config import preset
    from ..export.manifest import read_manifest
    from ..runtime.generate import generate_ids
    from ..runtime.ort_backend import OrtBackend
    from .bench_gpu import prompts_for
    from .bench_torch import TorchDecode, torch_model

    cfg = preset(name)
    manifest = read_manifest(artifact, verify=False)
    if manifest.config != cfg or manifest.dtype != "fp16":
        raise SystemExit(f"{artifact} is not an fp16 export of preset {name}")
    max_seq = manifest.max_seq
    if prompt_len + steps > max_seq:
        raise SystemExit(f"prompt {prompt_len} + {steps} steps exceed the artifact's max_seq {max_seq}")
    prompt = prompts_for(1, prompt_len, cfg.vocab_size)[0]
    dev = "cuda"

    model = torch_model(cfg, "fp16", max_seq)
    ref_dec = TorchDecode(model, 1, max_seq)
    first = ref_dec.prefill(torch.tensor([prompt], device=dev))
    toks, _ = ref_dec.decode(first, steps - 1)
    ref = [int(first[0])] + [t[0] for t in toks]
    del ref_dec
    seq = torch.tensor([prompt + ref[:-1]], device=dev)  # position prompt_len - 1 + t predicts ref[t]

    def full_logits(m: torch.nn.Module) -> torch.Tensor:
        S = seq.shape[1]
        cache = m.new_cache(1, max_seq, dev)
        m.static_kv = False
        with torch.inference_mode():
            lg, _ = m(seq, torch.arange(S, device=dev)[None], torch.zeros(1, dtype=torch.long, device=dev),
                      torch.full((1,), S, device=dev), cache, logits="all")
        return lg[0, prompt_len - 1:].float()  # [steps, V]

    torch16 = full_logits(model)
    judge = full_logits(model.float())
    del model
    torch.cuda.empty_cache()

    with OrtBackend(artifact, device="cuda") as ort_b:
        state = ort_b.allocate(1)
        rows = [ort_b.step(state, np.array([prompt]), np.arange(prompt_len)[None], np.zeros(1, np.int64),
                           np.array([prompt_len]))[:, -1].float().clone()]
        for t in range(steps - 1):
            p = prompt_len + t
            rows.append(ort_b.step(state, np.array([[ref[t]]]), np.array([[p]]), np.array([p]),
                                   np.array([p + 1]))[:, -1].float().clone())
        ort = torch.cat(rows)
        free = generate_ids(ort_b, [prompt], steps, eos_ids=())[0]
        graph = ort_b.cuda_graph

    def versus_judge(x: torch.Tensor) -> dict:
        err = (x - judge).abs()
        return {"argmax_agrees_with_fp32": float((x.argmax(-1) == judge.argmax(-1)).float().mean()),
                "max_abs_logit_error": float(err.max()), "mean_abs_logit_error": float(err.mean()),
                "rel_l2_error": float((x - judge).norm() / judge.norm())}

    top2 = judge.topk(2, dim=-1)
    ties = []
    for t in torch.nonzero(ort.argmax(-1) != torch16.argmax(-1)).flatten().tolist():
        ties.append({"step": t, "fp32_top2_margin": float(top2.values[t, 0] - top2.values[t, 1]),
                     "fp32_pick": int(top2.indices[t, 0]), "ort_pick": int(ort[t].argmax()),
                     "torch_fp16_pick": int(torch16[t].argmax()),
                     "ort_max_abs_error_here": float((ort[t] - judge[t]).abs().max()),
                     "torch_fp16_max_abs_error_here": float((torch16[t] - judge[t]).abs().max())})
    first_div = next((i for i, (x, y) in enumerate(zip(free, ref)) if x != y), steps)
    return {"model": name, "artifact": str(artifact), "dialect": manifest.dialect, "cuda_graph": graph,
            "steps": steps, "prompt_len": prompt_len, "logit_scale_fp32": float(judge.abs().max()),
            "ort_vs_fp32": versus_judge(ort), "torch_fp16_vs_fp32": versus_judge(torch16),
            "ort_vs_torch_fp16_argmax_agreement": float((ort.argmax(-1) == torch16.argmax(-1)).float().mean()),
            "disagreements": ties, "fp32_median_top2_margin": float((top2.values[:, 0] - top2.values[:, 1]).median()),
            "free_running_first_divergence_from_torch": first_div,
            "free_running_identical": first_div == steps}


if __name__ == "__main__":
    main()
