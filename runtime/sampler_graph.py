"""The torch work of a decode step (sampling, counts, advancing the step inputs) captured as one CUDA graph.

The torch sampler launches a dozen to thirty small kernels per step (penalties, filters, log-softmax, argmax,
the counts update); from Python that is about 0.45 ms of host time per step at batch 1 (measured on an H200
with the 1B shape), time in which the GPU idles because the decode loop waits for each token. Replaying them
as one graph costs one launch.

``CapturedStep(fn, restore)`` runs ``fn`` twice on a side stream (lazy handles and workspaces), puts back the
tensors in ``restore`` and the generators in ``generators`` (warm-up must not count as steps), captures one
``fn`` and replays it on the current stream. ``GraphedSampling(sampler, logits_BV, epilogue)`` captures
sample + observe for one fixed logits tensor (a backend's decode buffer, whose address never changes), plus an
optional epilogue on the result (the device loop writes the token into its inputs and advances the lengths).
Outputs are static tensors, overwritten by the next replay. Sampled configs need a CUDA generator that graphs
can advance (``CUDAGraph.register_generator_state``); without it only greedy configs are captured
(``capturable`` says which).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .sampler import SampleResult, Sampler


def capturable(sampler: Sampler, logits_BV: Any) -> bool:
    """True when this sampler's step can be captured for these logits (torch backend, a CUDA tensor)."""
    if sampler.backend != "torch":
        return False
    import torch

    if not isinstance(logits_BV, torch.Tensor) or logits_BV.device.type != "cuda":
        return False
    return sampler.config.greedy or hasattr(torch.cuda.CUDAGraph, "register_generator_state")


class CapturedStep:
    def __init__(self, fn: Callable[[], Any], device: Any, restore: Sequence[Any] = (),
                 generators: Sequence[Any] = (), warmup: int = 2) -> None:
        import torch

        self._stream = torch.cuda.current_stream(device)
        saved = [t.clone() for t in restore]
        states = [g.get_state() for g in generators]
        side = torch.cuda.Stream(device)
        side.wait_stream(self._stream)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        side.synchronize()
        for t, s in zip(restore, saved):
            t.copy_(s)
        for g, s in zip(generators, states):
            g.set_state(s)
        self.graph = torch.cuda.CUDAGraph()
        for g in generators:
            self.graph.register_generator_state(g)
        with torch.cuda.graph(self.graph, stream=side):
            self.out = fn()
        self._stream.wait_stream(side)

    def replay(self) -> Any:
        import torch

        with torch.cuda.stream(self._stream):
            self.graph.replay()
        return self.out


class GraphedSampling:
    def __init__(self, sampler: Sampler, logits_BV: Any, epilogue: Callable[[SampleResult], None] | None = None,
                 restore: Sequence[Any] = ()) -> None:
        """epilogue(result) is captured after sample + observe; `restore`: tensors it changes (warm-up)."""
        import torch

        if not capturable(sampler, logits_BV):
            raise ValueError("only a torch-backend sampler over CUDA logits can be captured")
        self.sampler, self.logits, self.epilogue = sampler, logits_BV, epilogue
        st = sampler._state
        B = sampler.batch_size
        self._active = torch.ones(B, dtype=torch.bool, device=logits_BV.device)
        self._active_host = torch.ones(B, dtype=torch.bool, pin_memory=True)
        self._copied = torch.cuda.Event()
        self._packed = torch.empty(2, B, dtype=torch.float64, device=logits_BV.device)
        self._packed_host = torch.empty(2, B, dtype=torch.float64, pin_memory=True)
        self._step = CapturedStep(self._body, logits_BV.device, [st.counts, *restore],
                                  [] if sampler.config.greedy else [st._gen])

    def reads(self, logits_BV: Any) -> bool:
        """True when `logits_BV` is the memory the graph reads (same address, shape and strides)."""
        t = self.logits
        return (logits_BV.data_ptr(), tuple(logits_BV.shape), logits_BV.stride()) == (t.data_ptr(), tuple(t.shape),
                                                                                     t.stride())

    def _body(self) -> SampleResult:
        import torch

        result = self.sampler.sample(self.logits)
        self.sampler.observe(result.tokens, self._active)
        if self.epilogue is not None:
            self.epilogue(result)
        # tokens and log-probs side by side for one device->host copy (float64 holds both exactly)
        torch.stack([result.tokens.double(), result.logprobs.double()], out=self._packed)
        return result

    def __call__(self, active_B: np.ndarray | None = None) -> SampleResult:
        """Sample from the current contents of the captured logits and count the tokens of active rows."""
        import torch

        host = self._active_host.numpy()
        want = True if active_B is None else np.asarray(active_B, dtype=bool)
        if not np.all(host == want):  # the device mask is copied only when it changes
            self._copied.synchronize()  # the last copy has read the pinned buffer before it is rewritten
            host[:] = want
            with torch.cuda.stream(self._step._stream):
                self._active.copy_(self._active_host, non_blocking=True)
                self._copied.record()
        return self._step.replay()

    def host(self, active_B: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As calling it, and the [B] tokens (int64) and log-probs (float32) on the host, in one copy."""
        import torch

        self(active_B)
        stream = self._step._stream
        with torch.cuda.stream(stream):
            self._packed_host.copy_(self._packed, non_blocking=True)
        stream.synchronize()
        packed = self._packed_host.numpy()
        return packed[0].astype(np.int64), packed[1].astype(np.float32)
