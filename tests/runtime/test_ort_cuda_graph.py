"""The ort backend's CUDA-graph decode (OrtOptions.cuda_graph): what it refuses runs everywhere; the tokens
it makes need onnxruntime-gpu and a CUDA GPU (compared with the same backend uncaptured, the device-resident
loop of runtime/ort_cuda.py, and transformers' generate() on the same GPU)."""

from __future__ import annotations

import pytest

from decodekit.graphs.pipeline import optimize
from decodekit.runtime.backend import BackendError
from decodekit.runtime.generate import generate_ids
from decodekit.runtime.ort_backend import GRAPH_SAFE_DIALECTS, OrtBackend, OrtOptions

PROMPTS = [[5, 17, 99, 3, 200, 42], [12, 250, 64, 9, 130, 7]]


def _gpu_ready() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "needs onnxruntime-gpu (this onnxruntime has no CUDA execution provider) and a CUDA GPU"
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU that PyTorch sees"
    return None


@pytest.fixture(scope="module")
def artifacts(exported, hf_checkpoint, tmp_path_factory):
    std = exported(str(hf_checkpoint("llama")), max_seq=96, max_batch=4)
    static = tmp_path_factory.mktemp("gqa-static") / "a"
    optimize(std, static, "ort-gqa-static", dtype="fp16")
    return {"std": std, "ort-gqa-static": static}


def test_graph_refused_where_lengths_are_read_on_the_host(artifacts):
    assert "std" not in GRAPH_SAFE_DIALECTS
    with pytest.raises(BackendError, match="stale lengths.*ort-gqa-static"):
        OrtBackend(artifacts["std"], device="cuda", cuda_graph=True)


def test_graph_option_needs_cuda():
    with pytest.raises(BackendError, match="cuda_graph applies to device cuda"):
        OrtOptions(device="cpu", cuda_graph=True)
    assert OrtOptions(device="cpu", cuda_graph=False).cuda_graph is False


def test_graph_decode_matches_uncaptured_and_transformers(artifacts, hf_checkpoint):
    reason = _gpu_ready()
    if reason:
        pytest.skip(reason)
    import torch
    import transformers

    from decodekit.runtime.ort_cuda import CudaDecodeOptions, OrtCudaDecoder

    art = artifacts["ort-gqa-static"]
    with OrtBackend(art, device="cuda", cuda_graph=False) as plain:
        want = generate_ids(plain, PROMPTS, 40, eos_ids=())
    with OrtBackend(art, device="cuda") as graphed:
        assert graphed.cuda_graph  # the default turns it on for this dialect
        first = graphed.allocate(2)
        assert generate_ids(graphed, PROMPTS, 40, eos_ids=(), state=first) == want
        # a second state is a second graph (its own buffer addresses); the first still replays correctly after it
        second = graphed.allocate(2)
        assert generate_ids(graphed, PROMPTS[::-1], 40, eos_ids=(), state=second) == want[::-1]
        assert generate_ids(graphed, PROMPTS, 40, eos_ids=(), state=first) == want
        assert generate_ids(graphed, [PROMPTS[0]], 40, eos_ids=()) == want[:1]  # batch 1: its own graph
    assert OrtCudaDecoder(art, 2).generate(PROMPTS, 40) == want  # sampler step captured with the advance
    argmax_only = OrtCudaDecoder(art, 2, CudaDecodeOptions(logprobs=False))  # argmax + advance captured
    assert argmax_only.generate(PROMPTS, 40) == want
    assert argmax_only.generate(PROMPTS, 40) == want  # a second call recaptures for its new sampler
    assert OrtCudaDecoder(art, 2, CudaDecodeOptions(cuda_graph=False)).generate(PROMPTS, 40) == want

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_checkpoint("llama"), dtype=torch.float16).cuda()
    ids = torch.tensor(PROMPTS, device="cuda")
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, min_new_tokens=40,
                      do_sample=False, pad_token_id=0)
    assert out[:, ids.shape[1]:].tolist() == want


def test_states_past_the_graph_cap_decode_uncaptured(artifacts, monkeypatch):
    reason = _gpu_ready()
    if reason:
        pytest.skip(reason)
    from decodekit.runtime import ort_backend

    monkeypatch.setattr(ort_backend, "MAX_CUDA_GRAPHS", 2)
    art = artifacts["ort-gqa-static"]
    with OrtBackend(art, device="cuda", cuda_graph=False) as plain:
        want = generate_ids(plain, PROMPTS, 24, eos_ids=())
    with OrtBackend(art, device="cuda") as graphed:
        states = [graphed.allocate(2), graphed.allocate(2)]
        with pytest.warns(UserWarning, match="without a CUDA graph"):
            states.append(graphed.allocate(2))
        for state in states[::-1]:
            assert generate_ids(graphed, PROMPTS, 24, eos_ids=(), state=state) == want
