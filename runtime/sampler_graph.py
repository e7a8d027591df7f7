"""One sampling step (sample + observe) captured as a PyTorch CUDA graph and replayed.

The torch sampler launches a dozen to thirty small kernels per step (penalties, filters, log-softmax, argmax,
the counts update); from Python that is about 0.45 ms of host time per step at batch 1 (measured on an H200
with the 1B shape), time in which the GPU idles because the decode loop waits for each token. Replaying them
as one graph costs one launch.

``GraphedSampling(sampler, logits_BV)`` captures the step for one fixed logits tensor (the backend's decode
logits buffer, whose address never changes) and the sampler's own buffers; call it with the [B] active mask.
The outputs are static tensors, overwritten by the next replay. Sampled configs need a CUDA generator that
graphs can advance (``CUDAGraph.register_generator_state``); without it only greedy configs are captured
(``capturable`` says which).
"""

from __future__ import annotations

from typing import Any

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


class GraphedSampling:
    def __init__(self, sampler: Sampler, logits_BV: Any, warmup: int = 2) -> None:
        import torch

        if not capturable(sampler, logits_BV):
            raise ValueError("only a torch-backend sampler over CUDA logits can be captured")
        self.sampler, self.logits = sampler, logits_BV
        st = sampler._state
        B = sampler.batch_size
        self._active = torch.ones(B, dtype=torch.bool, device=logits_BV.device)
        self._active_host = torch.ones(B, dtype=torch.bool, pin_memory=True)
        self._all_active = True
        self._stream = torch.cuda.current_stream(logits_BV.device)
        # warm-up on a side stream (lazy library handles, workspaces), then restore what it changed
        counts = st.counts.clone()
        rng = st._gen.get_state()
        side = torch.cuda.Stream(logits_BV.device)
        side.wait_stream(self._stream)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step()
        self._stream.wait_stream(side)
        st.counts.copy_(counts)
        st._gen.set_state(rng)
        self.graph = torch.cuda.CUDAGraph()
        if not sampler.config.greedy:
            self.graph.register_generator_state(st._gen)
        with torch.cuda.graph(self.graph, stream=side):
            self.out = self._step()
        self._stream.wait_stream(side)

    def reads(self, logits_BV: Any) -> bool:
        """True when `logits_BV` is the memory the graph reads (same address, shape and strides)."""
        t = self.logits
        return (logits_BV.data_ptr(), tuple(logits_BV.shape), logits_BV.stride()) == (t.data_ptr(), tuple(t.shape),
                                                                                     t.stride())

    def _step(self) -> SampleResult:
        result = self.sampler.sample(self.logits)
        self.sampler.observe(result.tokens, self._active)
        return result

    def __call__(self, active_B: np.ndarray | None = None) -> SampleResult:
        """Sample from the current contents of the captured logits and count the tokens of active rows."""
        import torch

        with torch.cuda.stream(self._stream):
            if active_B is not None or not self._all_active:  # the device mask changes only when asked to
                self._active_host.numpy()[:] = True if active_B is None else active_B
                self._active.copy_(self._active_host, non_blocking=True)
                self._all_active = active_B is None
            self.graph.replay()
        return self.out
