"""Config features decodekit implements, each against transformers' own model: export, run on ONNX Runtime CPU,
and the greedy tokens equal transformers' generate() for 32 steps (tiny random checkpoints: hidden 64, 2 layers).
"""

from __future__ import annotations

from typing import Any

import pytest

from helpers import ort_greedy, transformers_greedy

PROMPT = [5, 17, 99, 3, 200, 42, 7, 8, 150, 33, 71]
NEW = 32
MAX_SEQ = 48  # prompt + 32 new tokens fit; the sliding-window cases use a window of exactly this length

# (id, family, transformers config overrides, ModelConfig fields the export must carry)
FEATURES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("llama-attention_bias", "llama", {"attention_bias": True}, {"attention_bias": True, "o_bias": True}),
    ("llama-mlp_bias", "llama", {"mlp_bias": True}, {"mlp_bias": True}),
    *[(f"llama-{act}", "llama", {"hidden_act": act}, {"hidden_act": kind}) for act, kind in (
        ("gelu", "gelu"), ("gelu_python", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"),
        ("gelu_python_tanh", "gelu_tanh"), ("gelu_fast", "gelu_tanh"), ("gelu_accurate", "gelu_tanh"))],
    ("mistral-sliding_window=max_seq", "mistral", {"sliding_window": MAX_SEQ}, {"sliding_window": MAX_SEQ}),
    ("qwen2-sliding_window=max_seq", "qwen2",
     {"use_sliding_window": True, "sliding_window": MAX_SEQ, "max_window_layers": 1}, {"sliding_window": MAX_SEQ}),
    ("qwen3-attention_bias-gelu", "qwen3", {"attention_bias": True, "hidden_act": "gelu_pytorch_tanh"},
     {"attention_bias": True, "o_bias": True, "hidden_act": "gelu_tanh"}),
]


@pytest.mark.parametrize("family,overrides,expected", [f[1:] for f in FEATURES], ids=[f[0] for f in FEATURES])
def test_feature_greedy_tokens_match_transformers(hf_checkpoint, exported, one_thread, family, overrides, expected):
    from decodekit.export.manifest import read_manifest

    src = hf_checkpoint(family, **overrides)
    artifact = exported(str(src), max_seq=MAX_SEQ, max_batch=1)
    config = read_manifest(artifact).config
    assert {k: getattr(config, k) for k in expected} == expected
    ours = ort_greedy(artifact, PROMPT, NEW)
    assert ours == transformers_greedy(src, PROMPT, NEW)
    assert len(set(ours)) > 3  # the random model does not collapse onto one token


BIASED_GELU = {"attention_bias": True, "mlp_bias": True, "hidden_act": "gelu_new"}


@pytest.mark.parametrize("dialect", ["std", "ort-gqa", "ort-gqa-static", "decomposed"])
def test_biases_and_gelu_survive_each_dialect(hf_checkpoint, exported, one_thread, tmp_path, dialect):
    """The graphs/ pipeline (fuse projections with their biases, GQA / skip-norm fusion, decomposition)."""
    from decodekit.graphs.pipeline import optimize

    src = hf_checkpoint("llama", **BIASED_GELU)
    manifest, report = optimize(exported(str(src), max_seq=MAX_SEQ, max_batch=1), tmp_path / dialect, dialect)
    assert manifest.config.hidden_act == "gelu_tanh" and manifest.config.mlp_bias
    fused = report["counts"].get("fuse-projections")
    if fused:  # q/k/v and gate/up of each of the 2 layers fused together with their biases
        assert fused["biases"] == fused["groups"] == 4, fused
    assert ort_greedy(tmp_path / dialect, PROMPT, NEW) == transformers_greedy(src, PROMPT, NEW)
    from decodekit.tools.validate import validate

    report = validate(tmp_path / dialect, ["ort"], steps=4, reference="transformers")  # the source is kept
    assert report.passed and manifest.config_fields["ignored"], report.to_dict()


def test_biases_and_gelu_quantize(hf_checkpoint, exported, one_thread, tmp_path):
    """Weight-only int8 (MatMulNBits) replaces every linear MatMul and keeps the bias Adds and the Gelu: it stays
    close to fp32 on the prefill (int4 is too coarse for a bound on this random model: see tests/graphs)."""
    import numpy as np

    from decodekit.graphs.passes.quantize import QuantOptions
    from decodekit.graphs.pipeline import optimize
    from decodekit.runtime.pipeline import open_backend

    src = hf_checkpoint("llama", **BIASED_GELU)
    artifact = exported(str(src), max_seq=MAX_SEQ, max_batch=1)
    manifest, report = optimize(artifact, tmp_path / "q", "std", quantize=QuantOptions(bits=8, block_size=32))
    assert report["counts"]["quantize"]["MatMulNBits"] == 2 * 4, report["counts"]  # q/k/v, o, gate/up, down per layer
    ops = report["ranks"][0]["ops"]
    assert ops.get("Gelu") == 2 and ops.get("com.microsoft::MatMulNBits") == 8, ops
    ids = np.array([PROMPT], np.int64)
    inputs = (ids, np.arange(len(PROMPT))[None], np.zeros(1, np.int64), np.array([len(PROMPT)]))
    logits = []
    for a in (artifact, tmp_path / "q"):
        with open_backend(a, "ort") as b:
            logits.append(np.asarray(b.step(b.allocate(1), *inputs))[0])
    ref, q = logits
    assert np.isfinite(q).all()
    cos = (ref * q).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(q, axis=-1)
    top1 = float((ref.argmax(-1) == q.argmax(-1)).mean())
    print(f"\nint8 biased gelu llama prefill: cosine >= {cos.min():.5f}, top-1 agreement {top1:.3f}")
    assert cos.min() > 0.999 and top1 >= 0.9


@pytest.mark.parametrize("tp", [1, 2])
def test_biases_and_gelu_build_with_tensorrt_rtx(hf_checkpoint, exported, tmp_path, tp):
    """The fp16 graph builds with TensorRT-RTX on the CPU: Gelu becomes an ACTIVATION layer, biases elementwise."""
    pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (pip install tensorrt-rtx) to build engines")
    from decodekit.export.manifest import read_manifest
    from decodekit.graphs.trt.build import BuildOptions, build_engines

    import onnx

    from decodekit.graphs.trt import api
    from decodekit.graphs.trt.build import read_layer_information

    src = hf_checkpoint("llama", **BIASED_GELU)
    build_engines(exported(str(src), tp=tp, dtype="fp16", max_seq=MAX_SEQ, max_batch=2), tmp_path / "e",
                  BuildOptions(opt_seq=16))
    m = read_manifest(tmp_path / "e")
    types = m.engines["layer_types"]
    assert types["KV_CACHE_UPDATE"] == 4 and types.get("DIST_COLLECTIVE", 0) == (4 if tp == 2 else 0)
    layers = read_layer_information(tmp_path / "e")
    for rank in range(tp):
        graph = onnx.load(str(m.rank_file(tmp_path / "e", rank)), load_external_data=False).graph
        gelu = {n.name for n in graph.node if n.op_type == "Gelu"}
        in_engine = {n for x in layers[rank] for n in api.onnx_nodes(x)}
        assert len(gelu) == 2 and gelu <= in_engine, gelu - in_engine
