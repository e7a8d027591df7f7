"""The captured sampling step (runtime/sampler_graph.py) against the eager torch sampler: same tokens, log-probs
and counts step by step, for greedy, penalized and seeded sampled configs. Capture needs a CUDA GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decodekit.runtime.sampler import Sampler, SamplingConfig
from decodekit.runtime.sampler_graph import GraphedSampling, capturable

B, V = 3, 5000
CONFIGS = {
    "greedy": SamplingConfig(),
    "greedy+penalties": SamplingConfig(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
    "sampled": SamplingConfig(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.1, seed=7),
}


def test_only_torch_samplers_over_cuda_logits_are_capturable():
    assert not capturable(Sampler(SamplingConfig(), B, V), np.zeros((B, V), np.float32))
    assert not capturable(Sampler(SamplingConfig(), B, V, backend="torch"), torch.zeros(B, V))


@pytest.mark.parametrize("name", CONFIGS)
def test_graphed_step_equals_eager_step(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (CUDA graph capture)")
    config = CONFIGS[name]
    eager = Sampler(config, B, V, backend="torch", device="cuda")
    graphed = Sampler(config, B, V, backend="torch", device="cuda")
    if not capturable(graphed, torch.zeros(B, V, device="cuda")):
        pytest.skip("this PyTorch cannot advance a custom generator inside a CUDA graph")
    prompts = [[1, 2, 3], [4, 5], [6]]
    eager.reset(prompts)
    graphed.reset(prompts)
    buf = torch.empty(B, V, dtype=torch.float16, device="cuda")
    step = GraphedSampling(graphed, buf)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for i in range(12):
        buf.copy_(torch.randn(B, V, generator=gen, device="cuda") * 3)
        active = np.array([True, i < 5, True])
        want = eager.sample(buf)
        eager.observe(want.tokens, active)
        if i % 2:
            got = step(active)
            assert got.tokens.tolist() == want.tokens.tolist(), f"step {i}"
            torch.testing.assert_close(got.logprobs, want.logprobs)
        else:  # the one-copy host read
            tokens, logprobs = step.host(active)
            assert tokens.dtype == np.int64 and logprobs.dtype == np.float32
            assert tokens.tolist() == want.tokens.tolist(), f"step {i}"
            np.testing.assert_allclose(logprobs, want.logprobs.cpu().numpy(), rtol=1e-6)
    assert torch.equal(graphed.output_counts, eager.output_counts)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_two_stage_argmax_is_torch_argmax_ties_included(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from decodekit.runtime.sampler_torch import argmax_last

    gen = torch.Generator().manual_seed(0)
    for V in (128256, 151936, 32000, 4099):  # 4099 is prime: the one-stage fallback
        x = torch.randn(4, V, generator=gen).half()
        x[1, [7, 3000, V - 1]] = 9.0  # ties: the first index wins
        x[2, :] = 0.0
        x[3, V - 1] = 9.0
        x = x.to(device)
        assert argmax_last(x).tolist() == x.argmax(dim=-1).tolist() == [argmax_last(x)[0].item(), 7, 0, V - 1]
