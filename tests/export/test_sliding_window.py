"""Sliding-window attention and the Gemma families through ONNX Runtime, against transformers' own models.

Each model has a window (8 tokens) shorter than its prompt + generation, on every layer (Mistral) or on some
(Qwen2's max_window_layers, Gemma 2's alternating layers, Gemma 3's layer_types with local / global RoPE). On
the std dialect (the mask built in-graph), on ort-gqa (GroupQueryAttention's local_window_size and softcap) and
on the decomposed one (opset 21: the same mask, the soft cap as Div / Tanh / Mul) and, for Gemma 2, on "trt":
prefill and teacher-forced decode logits within the fp32 tolerance of transformers' full forward, and 64 greedy
tokens of a batch of two prompts (right-padded prefill, ragged decode) identical to transformers' generate().
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

RTOL = 1e-4  # max |ours - ref| relative to the logit scale, as tests/export/test_model_parity.py
MAX_SEQ = 96
WINDOW = 8
PROMPTS = [[5, 17, 99, 3, 200, 42, 7, 8, 150, 33, 71], [12, 250, 64, 9, 130, 77]]  # 11 and 6 tokens
DECODE = [12, 250, 64, 9, 130, 77, 1, 201, 45, 88, 160, 31, 222, 6, 99, 140, 18, 240, 57, 3]
NEW = 64

# id -> (family, transformers config overrides, layer windows the export must carry)
MODELS: dict[str, tuple[str, dict[str, Any], list[int | None]]] = {
    "mistral": ("mistral", {"sliding_window": WINDOW}, [WINDOW, WINDOW]),
    "qwen2-max_window_layers": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW,
                                          "max_window_layers": 1}, [None, WINDOW]),
    "gemma2": ("gemma2", {}, [WINDOW, None, WINDOW, None]),
    "gemma3_text": ("gemma3_text", {}, [WINDOW, WINDOW, None, WINDOW]),
}
DIALECTS = ["std", "ort-gqa", "decomposed"]
# (model id, dialect): every model on every dialect, and Gemma 2 on "trt" (its soft caps decomposed for TensorRT)
CASES = [(name, dialect) for name in MODELS for dialect in DIALECTS] + [("gemma2", "trt")]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def artifact(hf_artifact):
    """(model id, dialect) -> (transformers folder, artifact); one export per model, one optimize per dialect."""

    def get(name: str, dialect: str) -> tuple[Path, Path]:
        family, overrides, _ = MODELS[name]
        return hf_artifact(family, dialect, MAX_SEQ, 2, **overrides)

    return get


def transformers_model(src: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    assert err <= RTOL * scale, f"{what}: max abs error {err:.3e} > {RTOL:g} x logit scale {scale:.3f}"


@pytest.mark.parametrize("name,dialect", CASES)
def test_prefill_and_decode_logits_match_transformers(artifact, name, dialect):
    from decodekit.export.manifest import read_manifest
    from decodekit.runtime.pipeline import open_backend

    src, art = artifact(name, dialect)
    config = read_manifest(art).config
    assert [config.window(i) for i in range(config.num_layers)] == MODELS[name][2]
    prompt = PROMPTS[0]
    with torch.no_grad():
        ref = transformers_model(src)(torch.tensor([prompt + DECODE])).logits[0].numpy()
    with open_backend(art, "ort") as b:
        state = b.allocate(1)
        n = len(prompt)
        logits = np.asarray(b.step(state, np.array([prompt]), np.arange(n)[None], np.zeros(1, np.int64),
                                   np.array([n])))
        assert_close(logits[0], ref[:n], f"{name} {dialect} prefill")
        for i, tok in enumerate(DECODE):
            logits = np.asarray(b.step(state, np.array([[tok]]), np.array([[n]]), np.array([n]), np.array([n + 1])))
            assert_close(logits[0, 0], ref[n], f"{name} {dialect} decode step {i} (position {n})")
            n += 1


@pytest.mark.parametrize("name,dialect", CASES)
def test_greedy_batch_matches_transformers_generate(artifact, name, dialect):
    from decodekit.runtime.generate import generate_ids
    from decodekit.runtime.pipeline import open_backend

    src, art = artifact(name, dialect)
    hf = transformers_model(src)
    expected = []
    with torch.no_grad():
        for p in PROMPTS:  # transformers generates each prompt alone
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    assert all(len(e) == NEW and len(set(e)) > 8 for e in expected), expected  # not a degenerate random model
    with open_backend(art, "ort") as backend:
        ours = generate_ids(backend, PROMPTS, NEW, eos_ids=())
    for b, (got, want) in enumerate(zip(ours, expected)):
        first = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), None)
        assert got == want, f"{name} {dialect} row {b} differs from transformers at token {first}"


@pytest.mark.parametrize("name", list(MODELS))
def test_ort_gqa_carries_window_and_softcap(artifact, name):
    """Every Attention became GroupQueryAttention, windowed layers with local_window_size = W (ORT counts the
    query's own key in the window, as transformers does)."""
    import onnx

    family, _, windows = MODELS[name]
    _, art = artifact(name, "ort-gqa")
    graph = onnx.load(str(art / "rank0.onnx"), load_external_data=False).graph
    gqa = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in graph.node
           if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == len(windows) and not [n for n in graph.node if n.op_type == "Attention"]
    assert [a.get("local_window_size", -1) for a in gqa] == [w or -1 for w in windows]
    assert {a.get("softcap") for a in gqa} == ({4.0} if family == "gemma2" else {None})


def test_decomposed_softcap_fuses_back_to_std(artifact, tmp_path):
    """decomposed -> std recovers one Attention per layer with Gemma 2's softcap."""
    import onnx

    from decodekit.graphs.pipeline import optimize

    _, decomposed = artifact("gemma2", "decomposed")
    _, report = optimize(decomposed, tmp_path / "std", "std")
    assert report["counts"]["fuse-std"]["Attention"] == 4, report["counts"]
    graph = onnx.load(str(tmp_path / "std" / "rank0.onnx"), load_external_data=False).graph
    caps = [onnx.helper.get_attribute_value(a) for n in graph.node if n.op_type == "Attention"
            for a in n.attribute if a.name == "softcap"]
    assert caps == [4.0] * 4


@pytest.mark.parametrize("name", list(MODELS))
def test_tensorrt_rtx_builds_fp16(hf_checkpoint, exported, tmp_path, name):
    """fp16 engines build with TensorRT-RTX on the CPU: the in-place KV_CACHE_UPDATE and ROTARY_EMBEDDING layers
    everywhere, fused ATTENTION where there is no soft cap, Gemma 2's soft-capped attention as matmuls + SOFTMAX
    from the "trt" dialect. (Running the engines needs a GPU TensorRT-RTX supports: not here.)"""
    pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (pip install tensorrt-rtx) to build engines")
    from decodekit.export.manifest import read_manifest
    from decodekit.graphs.pipeline import optimize
    from decodekit.graphs.trt.build import BuildOptions, build_engines

    family, overrides, windows = MODELS[name]
    art = exported(str(hf_checkpoint(family, **overrides)), dtype="fp16", max_seq=MAX_SEQ, max_batch=2)
    if family == "gemma2":
        optimize(art, tmp_path / "trt", "trt")
        art = tmp_path / "trt"
    build_engines(art, tmp_path / "e", BuildOptions(opt_seq=16))
    types = read_manifest(tmp_path / "e").engines["layer_types"]
    L = len(windows)
    assert types["KV_CACHE_UPDATE"] == 2 * L and types["ROTARY_EMBEDDING"] == 2 * L, types
    if family == "gemma2":
        assert types["SOFTMAX"] == L and "ATTENTION_INPUT" not in types, types
    else:
        assert types["ATTENTION_INPUT"] == L and "SOFTMAX" not in types, types
