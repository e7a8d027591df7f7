"""Float-zero-point grids as the integer MatMulNBits kernel + an exact per-block offset term
(graphs/quant.py split_offsets, graphs/passes/block_offsets.py), and the tied LM head in the quantize pass.

The oracle is torch: x @ W with W the grid dequantized, beside ONNX Runtime's own float-zero-point MatMulNBits.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest
import torch

from decodekit.graphs import quant
from decodekit.graphs.passes.quantize import QuantizePass, QuantOptions


def _q4_1_like(k: int, n: int, seed: int) -> np.ndarray:
    """Weights on a per-block [min, max] grid of 16 levels (a llama.cpp Q4_1 block) plus a little noise."""
    rng = np.random.default_rng(seed)
    nb = -(-k // 32)
    lo = np.repeat(rng.normal(-0.05, 0.02, (nb, n)), 32, 0)[:k]
    step = np.repeat(rng.uniform(0.002, 0.01, (nb, n)), 32, 0)[:k]
    return (lo + step * rng.integers(0, 16, (k, n)) + rng.normal(0, 1e-3, (k, n))).astype(np.float32)


@pytest.mark.parametrize("bits,k", [(4, 160), (4, 176), (8, 96)])
def test_split_offsets_is_exact(bits, k):
    q = quant.quantize_blockwise(_q4_1_like(k, 24, bits + k), bits, 32, False, float_zero_points=True)
    kernel, offsets = quant.split_offsets(q)
    assert kernel.symmetric and offsets.shape == (-(-k // 32), 24)
    rebuilt = quant.dequantize(kernel) + np.repeat(offsets, 32, 0)[:k]
    np.testing.assert_allclose(rebuilt, quant.dequantize(q), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="float-zero-point"):
        quant.split_offsets(quant.quantize_blockwise(_q4_1_like(k, 24, 0), bits, 32, False))


def test_q8_0_grid_is_reproduced_by_the_8_bit_head_scheme():
    """A llama.cpp Q8_0 block (d * q, q in [-127, 127], d = absmax / 127) comes back exactly from the 8-bit LM head
    scheme (symmetric, positive scales), which is why a GGUF's Q8_0 tied embedding loses nothing as an 8-bit head."""
    rng = np.random.default_rng(4)
    k, n = 96, 20
    q = rng.integers(-127, 128, (k, n))
    q[0::32] = np.where(rng.random((k // 32, n)) < 0.5, -127, 127)  # every block reaches +-127
    w = (np.repeat(rng.uniform(1e-4, 1e-3, (k // 32, n)).astype(np.float16).astype(np.float32), 32, 0) * q)
    opt = QuantOptions(4, 32, False, float_zero_points=True, lm_head=True, lm_head_bits=8).head_options()
    assert (opt.bits, opt.symmetric, opt.float_zero_points) == (8, True, False)
    got = quant.quantize_blockwise(w.astype(np.float32), 8, 32, True, positive_scales=True)
    np.testing.assert_allclose(quant.dequantize(got), w, rtol=1e-6, atol=0)


def _two_matmuls(k: int, n: int, w: np.ndarray, w2: np.ndarray) -> ir.Model:
    """x [2, 3, K] -> MatMul(x, W) and MatMul(x, W2), one activation read twice (as q/k/v are)."""
    inits = [onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(w2, "W2")]
    nodes = [oh.make_node("MatMul", ["x", "W"], ["y"], name="mm"), oh.make_node("MatMul", ["x", "W2"], ["y2"], name="mm2")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, k])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, n]),
                           oh.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, [2, 3, n])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    return ir.serde.deserialize_model(model)


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("bits,k", [(4, 160), (4, 176), (8, 128)])
@pytest.mark.parametrize("level", [None, 4])
def test_offsets_equal_float_zero_point_kernel(bits, k, level):
    """Integer kernel + offsets == ORT's float-zero-point MatMulNBits == torch x @ dequantize(W), fp32 tolerance
    (accuracy_level 4 quantizes the activations of the kernel's part to int8: there, within that rounding)."""
    n = 40
    w, w2 = _q4_1_like(k, n, 1), _q4_1_like(k, n, 2)
    x = np.random.default_rng(3).normal(0, 1, (2, 3, k)).astype(np.float32)
    opt = QuantOptions(bits, 32, False, float_zero_points=True, accuracy_level=level, lm_head=True)  # outputs
    model = _two_matmuls(k, n, w, w2)
    p = QuantizePass(opt)
    p(model)
    assert p.report.counts["MatMulNBits"] == 2
    ops = [nd.op_type for nd in model.graph]
    assert ops.count("MatMul") == 3 and ops.count("Add") == 2  # one block-sum MatMul shared by both
    assert all(len(nd.inputs) == 3 for nd in model.graph if nd.op_type == "MatMulNBits")  # no zero-point input
    y, y2 = _run(model, x)
    for got, weight in ((y, w), (y2, w2)):
        q = quant.quantize_blockwise(weight, bits, 32, False, float_zero_points=True)
        ref = (torch.from_numpy(x).double() @ torch.from_numpy(quant.dequantize(q)).double()).numpy()
        scale = float(np.abs(ref).max())
        err = float(np.abs(got - ref).max()) / scale
        assert err <= (2e-2 if level == 4 else 1e-6), err
    if bits == 4:  # ORT's own float-zero-point kernel on the same grid (8-bit float zero points it refuses)
        model = _two_matmuls(k, n, w, w2)
        QuantizePass(QuantOptions(bits, 32, False, float_zero_points=True, float_zp_form="input", lm_head=True,
                                  accuracy_level=level))(model)
        assert [nd.op_type for nd in model.graph] == ["MatMulNBits", "MatMulNBits"]
        zp_y, _ = _run(model, x)
        tol = 2e-2 if level == 4 else 1e-6
        assert float(np.abs(y - zp_y).max()) <= tol * float(np.abs(zp_y).max())


def test_scheme_names_and_validation():
    assert QuantOptions(4, 32, False, float_zero_points=True).scheme == "int4-b32-asymf"
    assert QuantOptions(4, 32, False, float_zero_points=True, float_zp_form="input").scheme == "int4-b32-asymf-zpinput"
    assert QuantOptions(4, 32, False, float_zero_points=True, lm_head=True, lm_head_bits=8).scheme \
        == "int4-b32-asymf-lmhead8"
    assert QuantOptions(4, 32, False, lm_head=True, lm_head_bits=4).scheme == "int4-b32-asym-lmhead"
    from decodekit.graphs.passes.base import DialectError

    with pytest.raises(DialectError, match="float zero point form"):
        QuantOptions(4, 32, False, float_zero_points=True, float_zp_form="fused")


@pytest.mark.parametrize("dialect,head_bits", [("std", None), ("ort-gqa", 8)])
def test_tied_lm_head_is_quantized(dialect, head_bits, hf_checkpoint, exported, tmp_path):
    """A tied head (std: MatMul(h, Transpose(E)); ORT dialects: FusedMatMul(h, E, transB=1)) becomes MatMulNBits with
    lm_head=True, the embedding Gather keeps the float table, and nothing of the old head is left."""
    from decodekit.graphs.pipeline import optimize
    from decodekit.runtime.generate import generate_ids
    from decodekit.runtime.pipeline import open_backend

    art = exported(str(hf_checkpoint("llama", tie_word_embeddings=True)), max_seq=32, max_batch=1)
    opt = QuantOptions(4, 32, False, float_zero_points=True, lm_head=True, lm_head_bits=head_bits)
    manifest, report = optimize(art, tmp_path / "q", dialect, quantize=opt)
    counts = next(p for p in manifest.passes if p["name"] == "quantize")["counts"]
    ops = report["ranks"][0]["ops"]
    assert counts["skipped_lm_head"] == 0 and counts["MatMulNBits"] == ops["com.microsoft::MatMulNBits"] == 4 * 2 + 1
    assert "com.microsoft::FusedMatMul" not in ops
    graph = onnx.load(str(manifest.rank_file(tmp_path / "q")), load_external_data=False).graph
    table = next(nd.input[0] for nd in graph.node if nd.op_type == "Gather" and nd.input[0] in
                 {i.name for i in graph.initializer})
    assert [nd.op_type for nd in graph.node if table in nd.input] == ["Gather"]  # the float table: lookup only
    widths = sorted(a.i for nd in graph.node if nd.op_type == "MatMulNBits" for a in nd.attribute if a.name == "bits")
    assert widths == [4] * 8 + [head_bits or 4]
    with open_backend(tmp_path / "q", "ort") as quantized, open_backend(art, "ort") as fp32:
        a, b = (generate_ids(be, [[1, 2, 3]], 6, eos_ids=())[0] for be in (quantized, fp32))
    assert len(a) == len(b) == 6
