"""ONNX Runtime CUDA fast path: every buffer on the GPU, lengths advanced on the device, the decode step
replayed as a CUDA graph, sampling on the GPU.

    prefill: one ordinary run (run option gpu_graph_id=-1: not captured), right-padded batch, optionally through a
             second session of another artifact of the same model (for a decode graph that cannot prefill;
             ort-gqa-static prefills itself, any batch, as GroupQueryAttention's first-prompt case)
    decode:  ids_B1, pos_B1, write_B, nonpad_B, caches and logits_B1V are torch CUDA tensors at fixed
             addresses bound once; each step = graph replay + sample (torch, on the same stream; captured as
             a second graph with cuda_graph: runtime/sampler_graph.py) + in-place increments; the host never
             waits until it reads the tokens.

ONNX Runtime is given PyTorch's current stream (provider option user_compute_stream) and synchronises it at
the end of every run; before each run the host waits for torch's sampling and increments (measured on an H100:
without these waits the sampler raced ORT's kernels). Step times are host wall-clock times, which is what a
caller sees. The KV cache is bound as past AND present.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..export.manifest import read_manifest
from .backend import BackendError
from .ort_backend import ONNX_TYPES, OrtBackend, OrtOptions, past_names, present_names
from .sampler import Sampler, SamplingConfig
from .sampler_graph import CapturedStep, GraphedSampling, capturable
from .sampler_torch import argmax_last


@dataclass(frozen=True)
class CudaDecodeOptions:
    device_id: int = 0
    cuda_graph: bool = True
    sync_each_step: bool = False  # True: read each token on the host as it is made (streaming)
    logprobs: bool = True  # False with greedy, penalty-free sampling: one argmax written straight into the inputs


class OrtCudaDecoder:
    """Greedy / sampled decode of a tp=1 fp16/bf16/fp32 artifact on one GPU through ONNX Runtime's CUDA EP."""

    def __init__(self, artifact: str | Path, batch: int, options: CudaDecodeOptions = CudaDecodeOptions(),
                 prefill_artifact: str | Path | None = None) -> None:
        import torch

        if not torch.cuda.is_available():
            raise BackendError("the ORT CUDA fast path needs a CUDA GPU (torch.cuda.is_available() is False)")
        self.options, self.batch = options, batch
        torch.cuda.set_device(options.device_id)
        self.stream = torch.cuda.current_stream()
        manifest = read_manifest(artifact)
        # OrtBackend gives ORT PyTorch's current stream and turns CUDA graphs on (refusing a dialect they break)
        self.backend = OrtBackend(artifact, OrtOptions(device="cuda", device_id=options.device_id,
                                                       cuda_graph=options.cuda_graph), manifest=manifest)
        self.prefill_backend = self.backend
        if prefill_artifact is not None:
            pm = read_manifest(prefill_artifact)
            if pm.config != manifest.config or pm.max_seq != manifest.max_seq or pm.dtype != manifest.dtype:
                raise BackendError(f"{prefill_artifact} is not the same model / max_seq / dtype as {artifact}")
            self.prefill_backend = OrtBackend(prefill_artifact, OrtOptions(device="cuda", device_id=options.device_id,
                                                                           cuda_graph=False), manifest=pm)
        m = manifest
        self.L, self.V, self.max_seq = m.config.num_layers, m.config.vocab_size, m.max_seq
        self.tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[m.dtype]
        self.etype = ONNX_TYPES[m.dtype]
        dev = f"cuda:{options.device_id}"
        kv = (batch, int(m.kv_layout["kv_heads_local"]), m.max_seq, int(m.kv_layout["head_dim"]))
        self.caches = [torch.zeros(kv, dtype=self.tdtype, device=dev) for _ in range(2 * self.L)]
        i64 = dict(dtype=torch.int64, device=dev)
        self.ids, self.pos = torch.zeros(batch, 1, **i64), torch.zeros(batch, 1, **i64)
        self.write, self.nonpad = torch.zeros(batch, **i64), torch.ones(batch, **i64)
        self.logits = torch.empty(batch, 1, self.V, dtype=self.tdtype, device=dev)
        self.decode_binding = self._binding({"input_ids": self.ids, "position_ids": self.pos,
                                             "write_indices": self.write, "nonpad_kv_seqlen": self.nonpad},
                                            self.logits)
        import onnxruntime as ort

        self.run_decode = ort.RunOptions()
        self.run_decode.add_run_config_entry("gpu_graph_id", str(batch))
        self._post: Callable[[], Any] = lambda: None  # the torch part of a decode step, for _post_sampler
        self._post_sampler: Sampler | None = None
        self.run_prefill = ort.RunOptions()
        self.run_prefill.add_run_config_entry("gpu_graph_id", "-1")

    def _bind(self, binding: Any, name: str, t: Any, output: bool) -> None:
        etype = self.etype if t.is_floating_point() else 7  # TensorProto INT64
        bind = binding.bind_output if output else binding.bind_input
        bind(name, "cuda", self.options.device_id, etype, list(t.shape), t.data_ptr())

    def _binding(self, inputs: dict[str, Any], logits: Any, backend: OrtBackend | None = None) -> Any:
        b = (backend or self.backend).session.io_binding()
        for name, t in inputs.items():
            self._bind(b, name, t, output=False)
        self._bind(b, "logits", logits, output=True)
        for past, present, t in zip(past_names(self.L), present_names(self.L), self.caches):
            self._bind(b, past, t, output=False)
            self._bind(b, present, t, output=True)
        return b

    def prefill(self, prompts: list[list[int]]) -> Any:
        """Right-padded prefill of the whole batch; returns each sequence's last-position logits [B, V]."""
        import torch

        B = len(prompts)
        if B != self.batch:
            raise BackendError(f"this decoder was built for batch {self.batch}, got {B} prompts")
        lens = torch.tensor([len(p) for p in prompts], device=self.ids.device)
        S = int(max(len(p) for p in prompts))
        ids = torch.zeros(B, S, dtype=torch.int64, device=self.ids.device)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p)
        pos = torch.arange(S, device=ids.device).repeat(B, 1)
        write = torch.zeros(B, dtype=torch.int64, device=ids.device)
        last = self.backend.manifest.logits == "last"
        logits = torch.empty(B, 1 if last else S, self.V, dtype=self.tdtype, device=ids.device)
        binding = self._binding({"input_ids": ids, "position_ids": pos, "write_indices": write,
                                 "nonpad_kv_seqlen": lens}, logits, self.prefill_backend)
        self.stream.synchronize()
        self.prefill_backend.session.run_with_iobinding(binding, self.run_prefill)
        self.pos[:, 0] = lens
        self.write.copy_(lens)
        self.nonpad.copy_(lens + 1)
        self._keep = (ids, pos, write, lens, logits, binding)  # alive until the stream has used them
        return logits[:, 0] if last else logits[torch.arange(B, device=ids.device), lens - 1]

    def _argmax_only(self, sampler: Sampler) -> bool:
        c = sampler.config
        return not self.options.logprobs and c.greedy and not c.has_penalties

    def decode_step(self, sampler: Sampler, out_tokens: Any) -> None:
        """One decode step: graph replay, sample into ids, advance lengths; all on the device."""
        self.stream.synchronize()  # torch's writes of ids / lengths are done before ORT reads them
        self.backend.session.run_with_iobinding(self.decode_binding, self.run_decode)
        if self._post_sampler is not sampler:
            self._post, self._post_sampler = self._post_step(sampler), sampler
        out_tokens.copy_(self._post())

    def _post_step(self, sampler: Sampler) -> Callable[[], Any]:
        """The torch part of a step (choose the token, write it into ids, advance the lengths); with cuda_graph,
        captured as one graph (runtime/sampler_graph.py), so the host launches one replay instead of ~10-30
        kernels while the GPU waits."""
        logits = self.logits[:, 0]
        inputs = [self.ids, self.pos, self.write, self.nonpad]

        def advance(tok: Any) -> None:
            self.ids[:, 0] = tok
            self.pos += 1
            self.write += 1
            self.nonpad += 1

        if self._argmax_only(sampler):
            def choose() -> Any:
                tok = argmax_last(logits)
                advance(tok)
                return tok
            return CapturedStep(choose, logits.device, inputs).replay if self.options.cuda_graph else choose
        if self.options.cuda_graph and capturable(sampler, logits):
            graphed = GraphedSampling(sampler, logits, epilogue=lambda r: advance(r.tokens), restore=inputs)
            return lambda: graphed().tokens

        def eager() -> Any:
            tok = sampler.sample(logits).tokens
            sampler.observe(tok)
            advance(tok)
            return tok
        return eager

    def generate(self, prompts: list[list[int]], new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                 timings: list[float] | None = None) -> list[list[int]]:
        """Generate new_tokens per prompt (no early stop: benchmark and parity use); per-step ms into timings."""
        import torch

        if max(len(p) for p in prompts) + new_tokens > self.max_seq:
            raise BackendError(f"prompt + {new_tokens} new tokens exceed the artifact's max_seq {self.max_seq}")
        sampler = Sampler(sampling, self.batch, self.V, backend="torch", device=self.ids.device)
        sampler.reset(prompts)
        first = sampler.sample(self.prefill(prompts)).tokens
        sampler.observe(first)
        self.ids[:, 0] = first
        out = torch.empty(new_tokens, self.batch, dtype=torch.int64, device=self.ids.device)
        out[0] = first
        stamps = [time.perf_counter()]
        for i in range(1, new_tokens):
            self.decode_step(sampler, out[i])
            if self.options.sync_each_step:
                out[i].tolist()
            stamps.append(time.perf_counter())
        torch.cuda.synchronize()
        stamps[-1] = time.perf_counter()
        if timings is not None:  # step i's time = from its start to the next step's start (includes its sync)
            timings.extend((b - a) * 1e3 for a, b in zip(stamps, stamps[1:]))
        return out.T.tolist()
