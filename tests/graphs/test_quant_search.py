"""The error-minimizing scale search (graphs/quant.py method="search") and float zero points: never worse than
round-to-nearest per block, exact on a weight that lies on a Q4_1 grid, ONNX Runtime's MatMulNBits computes
A @ dequantize(W) on their output, and `decodekit optimize --quantize int4` picks each format's default."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from decodekit.graphs import quant
from decodekit.graphs.passes.base import DialectError
from decodekit.graphs.passes.quantize import QuantOptions


def _heavy_tailed(seed: int, k: int = 256, n: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, (k, n)) * 0.02).astype(np.float32)  # outliers, as trained weights have


def _block_err(w: np.ndarray, q: quant.Blockwise) -> np.ndarray:
    d = quant.dequantize(q) - w
    k, n = w.shape
    return np.square(d).T.reshape(n, -1, q.block).sum(-1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric,positive", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("block", [32, 128])
def test_search_never_worse_than_rtn(bits, symmetric, positive, block):
    w = _heavy_tailed(bits + block)
    rtn = quant.quantize_blockwise(w, bits, block, symmetric, positive_scales=positive)
    best = quant.quantize_blockwise(w, bits, block, symmetric, positive_scales=positive, method="search")
    assert np.all(_block_err(w, best) <= _block_err(w, rtn) * (1 + 1e-5) + 1e-12)
    if bits == 4:  # clipping outliers pays off at 4 bits
        assert _block_err(w, best).sum() < 0.97 * _block_err(w, rtn).sum()
    if symmetric:
        assert np.all(best.zero_points == 1 << (bits - 1))
    if positive:
        assert np.all(best.scales > 0)


def test_float_zero_points_reproduce_a_q4_1_grid():
    """Blocks on a llama.cpp Q4_1 grid (min + d * code, code 0..15, both ends used) come back exactly."""
    rng = np.random.default_rng(3)
    k, n = 256, 16
    mins = rng.normal(-0.05, 0.01, (k // 32, n)).astype(np.float32)
    steps = rng.uniform(0.002, 0.01, (k // 32, n)).astype(np.float32)
    codes = rng.integers(0, 16, (k, n)).astype(np.float32)
    codes[0::32], codes[1::32] = 0, 15  # every block spans the whole grid, as Q4_1 blocks do
    w = np.repeat(mins, 32, 0) + np.repeat(steps, 32, 0) * codes
    for method in ("rtn", "search"):
        q = quant.quantize_blockwise(w, 4, 32, False, method=method, float_zero_points=True)
        np.testing.assert_allclose(quant.dequantize(q), w, rtol=0, atol=1e-6)
    x = _heavy_tailed(5)
    as_int = quant.quantize_blockwise(x, 4, 32, False)
    as_float = quant.quantize_blockwise(x, 4, 32, False, float_zero_points=True)
    assert _block_err(x, as_float).sum() < 1.02 * _block_err(x, as_int).sum()  # zero-mean blocks: about equal
    with pytest.raises(DialectError, match="float zero points"):
        QuantOptions(4, 32, True, float_zero_points=True)


@pytest.mark.parametrize("symmetric,float_zp", [(True, False), (False, False), (False, True)])
def test_search_output_runs_in_matmul_nbits(symmetric, float_zp):
    import onnxruntime as ort

    k, n = 160, 24
    w = _heavy_tailed(7, k, n)
    a = np.random.default_rng(1).normal(0, 1, (2, 3, k)).astype(np.float32)
    q = quant.quantize_blockwise(w, 4, 32, symmetric, method="search", float_zero_points=float_zp)
    b, scales, zp = quant.matmul_nbits_tensors(q)
    inits = [onnx.numpy_helper.from_array(b, "B"), onnx.numpy_helper.from_array(scales.reshape(-1), "scales")]
    if zp is not None:
        inits.append(onnx.numpy_helper.from_array(zp.reshape(-1), "zp"))
    node = oh.make_node("MatMulNBits", ["A", "B", "scales"] + (["zp"] if zp is not None else []), ["Y"],
                        domain="com.microsoft", K=k, N=n, bits=4, block_size=32)
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [2, 3, k])],
                          [oh.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [2, 3, n])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)],
                          ir_version=10)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    np.testing.assert_allclose(y, a @ quant.dequantize(q), rtol=1e-4, atol=1e-4)


def test_method_is_validated_and_named():
    assert QuantOptions(4, 32, False, method="search").scheme == "int4-b32-asym-search"
    with pytest.raises(DialectError, match="quantization method"):
        QuantOptions(method="gptq")


@pytest.mark.parametrize("fmt,scheme", [("ort", "int4-b32-asymf-lmhead8"), ("qdq", "int4-b32-sym-qdq")])
def test_cli_default_scheme_per_format(exported, tmp_path, fmt, scheme):
    """`--quantize int4` alone picks the format's default (TensorRT's qdq form stays symmetric)."""
    import json

    from click.testing import CliRunner

    from decodekit.tools.cli import cli

    args = ["optimize", str(exported("preset:tiny")), "-o", str(tmp_path / "q"), "--dialect", "std",
            "--quantize", "int4", "--block-size", "16" if fmt == "qdq" else "32", "--quant-format", fmt, "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["quantization"] == scheme.replace("b32", "b16" if fmt == "qdq" else "b32")
    from decodekit.runtime.generate import generate_ids
    from decodekit.runtime.pipeline import open_backend

    with open_backend(tmp_path / "q", "ort") as backend:  # the offsets + integer MatMulNBits graph runs in ORT
        assert len(generate_ids(backend, [[1, 2, 3]], 4, eos_ids=())[0]) == 4
