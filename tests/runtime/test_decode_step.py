"""The device-resident decode step (runtime/decode_step.py) and its CUDA graph (runtime/cuda_graph.py).

What is refused runs everywhere. The captured step needs onnxruntime-gpu and a CUDA GPU (marker ``gpu``): its
greedy tokens are compared with the same loop run eagerly, with the PyTorch reference on the GPU and with
transformers' generate(); its seeded sampled tokens with the eager loop, token for token.
"""

from __future__ import annotations

import pytest
import torch

from decodekit.graphs.pipeline import optimize
from decodekit.runtime.backend import BackendError
from decodekit.runtime.generate import generate_ids, generate_result
from decodekit.runtime.ort_backend import OrtBackend, OrtOptions
from decodekit.runtime.sampler import Sampler, SamplingConfig

PROMPTS = [[5, 17, 99, 3, 200, 42], [12, 250, 64, 9, 130, 7]]
SEEDED = SamplingConfig(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.1, seed=7)


def _gpu_ready() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "needs onnxruntime-gpu (this onnxruntime has no CUDA execution provider) and a CUDA GPU"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU that PyTorch sees"
    return None


def _need_gpu() -> None:
    reason = _gpu_ready()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def artifacts(exported, hf_checkpoint, tmp_path_factory):
    std = exported(str(hf_checkpoint("llama")), max_seq=96, max_batch=4)
    static = tmp_path_factory.mktemp("gqa-static") / "a"
    optimize(std, static, "ort-gqa-static", dtype="fp16")
    return {"std": std, "ort-gqa-static": static}


def test_capabilities_come_from_the_manifest(artifacts):
    from decodekit.export.manifest import read_manifest

    std, static = (read_manifest(artifacts[k]) for k in ("std", "ort-gqa-static"))
    assert std.capabilities == {"mixed_lengths": True, "cache_append": True, "host_free_decode": False}
    assert static.allows("host_free_decode") and not static.allows("mixed_lengths")
    with pytest.raises(KeyError, match="unknown capability"):
        std.allows("warp_drive")


def test_no_host_free_step_where_ort_gpu_runs_gqa_on_the_cpu(artifacts, tmp_path):
    """onnxruntime-gpu has fp16/bf16 GroupQueryAttention kernels only: an fp32 ort-gqa-static artifact records
    host_free_decode False (its CUDA step would copy to the host), the fp16 one True."""
    from decodekit.export.manifest import read_manifest

    fp32, _ = optimize(artifacts["std"], tmp_path / "fp32", "ort-gqa-static")
    assert fp32.dtype == "fp32" and not fp32.cuda_resident() and not fp32.allows("host_free_decode")
    fp16 = read_manifest(artifacts["ort-gqa-static"])
    assert fp16.cuda_resident() and fp16.allows("host_free_decode")


@pytest.mark.gpu
def test_graph_refused_where_lengths_are_read_on_the_host(artifacts):
    _need_gpu()
    with pytest.raises(BackendError, match="stale lengths.*ort-gqa-static"):
        OrtBackend(artifacts["std"], device="cuda", cuda_graph=True)


def test_graph_option_needs_cuda():
    with pytest.raises(BackendError, match="cuda_graph applies to device cuda"):
        OrtOptions(device="cpu", cuda_graph=True)
    assert OrtOptions(device="cpu", cuda_graph=False).cuda_graph is False


def test_cpu_loop_never_captures(artifacts):
    with OrtBackend(artifacts["std"]) as b:
        state = b.allocate(2)
        generate_ids(b, PROMPTS, 8, eos_ids=(), state=state)
        (step,) = state.steps.values()
        assert not step.captured and not b.capturable(state) and b.captured_steps == 0


@pytest.mark.gpu
def test_captured_greedy_equals_eager_reference_and_transformers(artifacts, hf_checkpoint):
    _need_gpu()
    import transformers

    art = artifacts["ort-gqa-static"]
    one = PROMPTS[:1]
    with OrtBackend(art, device="cuda", cuda_graph=False) as plain:
        want = generate_ids(plain, one, 64, eos_ids=())
        want2 = generate_ids(plain, PROMPTS, 40, eos_ids=())
    with OrtBackend(art, device="cuda") as graphed:
        state = graphed.allocate(1)
        assert generate_ids(graphed, one, 64, eos_ids=(), state=state) == want
        (step,) = state.steps.values()
        assert step.captured and graphed.captured_steps == 1
        assert generate_ids(graphed, one, 64, eos_ids=(), state=state) == want  # replayed, not recaptured
        assert graphed.captured_steps == 1
        # a second state is a second graph (its own buffer addresses); the first still replays correctly after it
        assert generate_ids(graphed, PROMPTS, 40, eos_ids=()) == want2
        assert generate_ids(graphed, one, 64, eos_ids=(), state=state) == want
    from decodekit.runtime.torch_backend import TorchBackend

    with TorchBackend(art, device="cuda") as ref:  # the PyTorch reference, fp16 on the GPU
        assert generate_ids(ref, one, 64, eos_ids=()) == want
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_checkpoint("llama"), dtype=torch.float16).cuda()
    ids = torch.tensor(one, device="cuda")
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                      do_sample=False, pad_token_id=0)
    assert out[:, ids.shape[1]:].tolist() == want


@pytest.mark.gpu
@pytest.mark.parametrize("config", [SEEDED, SamplingConfig(repetition_penalty=1.3, presence_penalty=0.5)],
                         ids=["seeded", "penalized-greedy"])
def test_captured_sampling_equals_eager_token_for_token(artifacts, config):
    _need_gpu()
    art = artifacts["ort-gqa-static"]
    with OrtBackend(art, device="cuda", cuda_graph=False) as plain:
        want = generate_result(plain, PROMPTS, 48, config, eos_ids=())
    with OrtBackend(art, device="cuda") as graphed:
        state = graphed.allocate(2)
        for _ in range(2):  # the second run replays the same graph, re-seeded
            got = generate_result(graphed, PROMPTS, 48, config, eos_ids=(), state=state)
            assert got.output_ids == want.output_ids
            torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs))
        assert next(iter(state.steps.values())).captured


@pytest.mark.gpu
def test_states_past_the_capture_cap_decode_eagerly(artifacts, monkeypatch):
    _need_gpu()
    from decodekit.runtime import decode_step

    monkeypatch.setattr(decode_step, "MAX_CAPTURED", 2)
    art = artifacts["ort-gqa-static"]
    with OrtBackend(art, device="cuda", cuda_graph=False) as plain:
        want = generate_ids(plain, PROMPTS, 24, eos_ids=())
    with OrtBackend(art, device="cuda") as graphed:
        states = [graphed.allocate(2) for _ in range(3)]
        assert generate_ids(graphed, PROMPTS, 24, eos_ids=(), state=states[0]) == want
        assert generate_ids(graphed, PROMPTS, 24, eos_ids=(), state=states[1]) == want
        with pytest.warns(UserWarning, match="without a CUDA graph"):
            assert generate_ids(graphed, PROMPTS, 24, eos_ids=(), state=states[2]) == want
        assert [next(iter(s.steps.values())).captured for s in states] == [True, True, False]


@pytest.mark.gpu
@pytest.mark.parametrize("config", [SamplingConfig(), SEEDED], ids=["greedy", "seeded"])
def test_captured_sampler_alone_equals_eager(config):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (CUDA graph capture)")
    from decodekit.runtime.cuda_graph import CapturedStep

    B, V = 3, 5000
    eager = Sampler(config, B, V, backend="torch", device="cuda")
    graphed = Sampler(config, B, V, backend="torch", device="cuda")
    for s in (eager, graphed):
        s.reset([[1, 2, 3], [4, 5], [6]])
    buf = torch.empty(B, V, dtype=torch.float16, device="cuda")
    stream = torch.cuda.Stream()
    gens = [] if config.greedy else [graphed._state._gen]
    step = CapturedStep(lambda: graphed.sample(buf), stream, [graphed._state.counts], gens)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for i in range(12):
        buf.copy_(torch.randn(B, V, generator=gen, device="cuda") * 3)
        want = eager.sample(buf)
        got = step.replay()
        stream.synchronize()
        assert got.tokens.tolist() == want.tokens.tolist(), f"step {i}"
        torch.testing.assert_close(got.logprobs, want.logprobs)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
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


def test_greedy_without_logprobs_same_tokens_nan_logprobs(artifacts):
    with OrtBackend(artifacts["std"]) as b:
        want = generate_result(b, PROMPTS, 12, eos_ids=())
        got = generate_result(b, PROMPTS, 12, SamplingConfig(logprobs=False), eos_ids=())
    assert got.output_ids == want.output_ids
    assert all(lp != lp for row in got.logprobs for lp in row)  # NaN: not computed
    assert all(lp <= 0.0 for row in want.logprobs for lp in row)
