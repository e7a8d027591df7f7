"""The peers' runners of the harness (benchmarks/harness.py registers them as systems): transformers' generate() and
onnxruntime-genai's builder and Generator loop; each ``run(prompts, steps) -> DecodeRun`` as decodekit's runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from decodekit.tools.benchmarking import DecodeRun


class TransformersRunner:
    """A loaded transformers model's generate(), greedy, EOS ignored; each token stamped by a logits processor."""

    def __init__(self, model: Any, device: str = "cpu", cache: str | None = None) -> None:
        self.model, self.device, self.cache = model, device, cache

    def run(self, prompts: list[list[int]], steps: int) -> DecodeRun:
        import torch
        import transformers

        stamps: list[float] = []

        class Stamp(transformers.LogitsProcessor):  # called once per generated token, before its argmax
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        ids = torch.tensor(prompts, device=self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                      min_new_tokens=steps, do_sample=False, pad_token_id=0,
                                      cache_implementation=self.cache, logits_processor=[Stamp()])
        return DecodeRun((stamps[0] - start) * 1e3, [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])],
                         out[:, ids.shape[1]:].tolist())

    def close(self) -> None:
        self.model = None


def build_genai(hf: Path, work: Path, precision: str, device: str) -> tuple[Path, float]:
    """onnxruntime-genai's model builder on the same folder: (output folder, seconds)."""
    provider = {"cpu": "cpu", "cuda": "cuda"}[device]
    out = work / f"{hf.name}-genai-{precision}-{provider}"
    t = time.perf_counter()
    if not (out / "genai_config.json").exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", precision, "-e", provider, "-c", str(work / "genai-cache")], check=True)
    return out, time.perf_counter() - t


def genai_folder(base: Path, batch: int, max_length: int, graph: bool | None) -> Path:
    """A sibling of the builder's folder whose genai_config.json sets batch, max_length and (CUDA) the graph."""
    out = base.parent / f"{base.name}-b{batch}-{ {True: 'graph', False: 'nograph', None: 'plain'}[graph]}"
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
    cfg["search"].update({"batch_size": batch, "max_length": max_length, "do_sample": False})
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return out


class GenaiRunner:
    """onnxruntime-genai's Generator loop, reading every token on the host (get_next_tokens)."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(folder))

    def run(self, prompts: list[list[int]], steps: int) -> DecodeRun:
        import numpy as np

        params = self.og.GeneratorParams(self.model)
        n = len(prompts[0]) + steps
        params.set_search_options(max_length=n, min_length=n, do_sample=False)  # EOS ignored, as every system here
        gen = self.og.Generator(self.model, params)
        start = time.perf_counter()
        gen.append_tokens(np.array(prompts, dtype=np.int32))
        stamps, tokens = [], [[] for _ in prompts]
        for _ in range(steps):
            gen.generate_next_token()
            for b, t in enumerate(gen.get_next_tokens()):  # every token read on the host, as decodekit's loop
                tokens[b].append(int(t))
            stamps.append(time.perf_counter())
        del gen
        return DecodeRun((stamps[0] - start) * 1e3, [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])], tokens)

    def close(self) -> None:
        self.model = None
