"""PyTorch decode baselines for the GPU benchmark: our Decoder eager, torch.compile + CUDA graphs
(gpt-fast style), and transformers' generate() with a static cache. Each returns ms per decode step."""

from __future__ import annotations

import time

import torch

from ..export.checkpoint import random_model, torch_dtype
from ..export.config import ModelConfig
from ..export.model import Decoder


class TorchDecode(torch.nn.Module):
    """A greedy decode loop over our Decoder (gpt-fast style): the KV cache is module buffers (static addresses
    for CUDA graphs), step inputs are preallocated device tensors, and compiled steps never sync the host."""

    def __init__(self, model: Decoder, batch: int, max_seq: int, compiled: bool = False) -> None:
        super().__init__()
        self.model, self.batch, self.max_seq, self.compiled = model, batch, max_seq, compiled
        dev = model.embed.weight.device
        for i, (k, v) in enumerate(model.new_cache(batch, max_seq, dev)):
            self.register_buffer(f"k{i}", k)
            self.register_buffer(f"v{i}", v)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.write = torch.zeros(batch, dtype=torch.long, device=dev)
        self.nonpad = torch.ones(batch, dtype=torch.long, device=dev)
        self.step_fn = torch.compile(self.step, mode="reduce-overhead", fullgraph=True) if compiled else self.step

    @property
    def cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"k{i}"), getattr(self, f"v{i}")) for i in range(len(self.model.layers))]

    def step(self, ids, pos, write, nonpad):
        # fixed shapes in eager too (attention over the whole static cache, masked): no host sync per step, the
        # same graph torch.compile sees. Eager stays launch-bound either way (~50 kernels per layer; measured on an
        # H200: 50 ms/step for the 1B shape with the growing prefix, 37 ms/step for 8B at fixed shapes)
        self.model.static_kv = True
        logits, _ = self.model(ids, pos, write, nonpad, self.cache, logits="last")
        return logits[:, -1].argmax(-1)

    @torch.inference_mode()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        B, S = prompt.shape
        dev = prompt.device
        for k, v in self.cache:
            k.zero_()
            v.zero_()
        self.model.static_kv = False
        logits, _ = self.model(prompt, torch.arange(S, device=dev).repeat(B, 1), torch.zeros(B, dtype=torch.long, device=dev),
                               torch.full((B,), S, device=dev), self.cache, logits="last")
        self.pos.fill_(S)
        self.write.fill_(S)
        self.nonpad.fill_(S + 1)
        return logits[:, -1].argmax(-1)

    @torch.inference_mode()
    def decode(self, first: torch.Tensor, steps: int) -> tuple[list[list[int]], list[float]]:
        """Greedy steps; returns tokens per step and per-step host wall ms (the step's work is complete at the
        next step's start: the host waits for the GPU once per step, as a streaming caller does)."""
        self.ids[:, 0] = first
        out = torch.empty(steps, self.batch, dtype=torch.long, device=self.ids.device)
        torch.cuda.synchronize()
        stamps = [time.perf_counter()]
        for i in range(steps):
            tok = self.step_fn(self.ids, self.pos, self.write, self.nonpad)
            self.ids[:, 0] = tok
            out[i] = tok
            self.pos += 1
            self.write += 1
            self.nonpad += 1
            torch.cuda.current_stream().synchronize()
            stamps.append(time.perf_counter())
        return out.tolist(), [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]


def torch_model(config: ModelConfig, dtype: str, max_seq: int, seed: int = 0) -> Decoder:
    return random_model(config, dtype, seed, rope_positions=max_seq).cuda()


def hf_static_ms(config: ModelConfig, dtype: str, batch: int, prompt_len: int, new_tokens: int) -> float:
    """transformers generate() with cache_implementation='static': (t(N) - t(1)) / (N - 1) per decode step."""
    import transformers

    cls = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM"}[config.family]
    cfg_cls = getattr(transformers, cls.replace("ForCausalLM", "Config"))
    hf_cfg = cfg_cls(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                     intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                     num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                     head_dim=config.head_dim, tie_word_embeddings=config.tie_word_embeddings,
                     max_position_embeddings=prompt_len + new_tokens + 8)
    with torch.device("cuda"):
        model = getattr(transformers, cls)(hf_cfg).to(torch_dtype(dtype)).eval()
    ids = torch.randint(0, config.vocab_size, (batch, prompt_len), device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static")
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    run(new_tokens)  # warm-up
    return (min(run(new_tokens) for _ in range(2)) - min(run(1) for _ in range(2))) / (new_tokens - 1)
