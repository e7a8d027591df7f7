"""decodekit's PyTorch Decoder in a gpt-fast style greedy loop: the baseline systems torch-eager and torch-compile of
the harness (benchmarks/harness.py: TorchLoop).

The KV cache is module buffers (static addresses for CUDA graphs), step inputs are preallocated device tensors,
and a compiled step never syncs the host; every step's time is taken when its token is ready (one wait per step,
as a streaming caller waits).
"""

from __future__ import annotations

import time

import torch

from decodekit.tools.benchmarking import DecodeRun


class TorchDecode(torch.nn.Module):
    def __init__(self, ck, batch: int, compiled: bool = False) -> None:
        from decodekit.export.checkpoint import load_hf

        super().__init__()
        self.model = load_hf(ck.hf, ck.dtype, rope_positions=ck.max_seq).to(ck.device)
        self.batch, self.max_seq, self.device = batch, ck.max_seq, torch.device(ck.device)
        for i, (k, v) in enumerate(self.model.new_cache(batch, ck.max_seq, self.device)):
            self.register_buffer(f"k{i}", k)
            self.register_buffer(f"v{i}", v)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.write = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.nonpad = torch.ones(batch, dtype=torch.long, device=self.device)
        mode = "reduce-overhead" if self.device.type == "cuda" else "default"  # reduce-overhead: CUDA graphs
        self.step_fn = torch.compile(self.step, mode=mode, fullgraph=True) if compiled else self.step

    @property
    def cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"k{i}"), getattr(self, f"v{i}")) for i in range(len(self.model.layers))]

    def step(self, ids, pos, write, nonpad):
        # fixed shapes in eager too (attention over the whole static cache, masked): no host sync per step, the
        # same graph torch.compile sees. Eager stays launch-bound either way (~50 kernels per layer)
        self.model.static_kv = True
        logits, _ = self.model(ids, pos, write, nonpad, self.cache, logits="last")
        return logits[:, -1].argmax(-1)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], steps: int) -> DecodeRun:
        prompt = torch.tensor(prompts, device=self.device)
        B, S = prompt.shape
        start = time.perf_counter()
        for k, v in self.cache:
            k.zero_()
            v.zero_()
        self.model.static_kv = False
        logits, _ = self.model(prompt, torch.arange(S, device=self.device).repeat(B, 1),
                               torch.zeros(B, dtype=torch.long, device=self.device),
                               torch.full((B,), S, device=self.device), self.cache, logits="last")
        self.ids[:, 0] = logits[:, -1].argmax(-1)
        self.pos.fill_(S)
        self.write.fill_(S)
        self.nonpad.fill_(S + 1)
        out = torch.empty(steps, B, dtype=torch.long, device=self.device)
        out[0] = self.ids[:, 0]
        self._sync()
        stamps = [time.perf_counter()]
        for i in range(1, steps):
            tok = self.step_fn(self.ids, self.pos, self.write, self.nonpad)
            self.ids[:, 0] = tok
            out[i] = tok
            self.pos += 1
            self.write += 1
            self.nonpad += 1
            self._sync()
            stamps.append(time.perf_counter())
        return DecodeRun((stamps[0] - start) * 1e3, [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])],
                         out.T.tolist())

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
