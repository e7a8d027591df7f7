"""The one dtype table (dtypes.py) agrees with the libraries' own tables: onnx, onnx_ir, numpy, torch, ONNX Runtime,
TensorRT-RTX and safetensors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from decodekit import dtypes
from decodekit.errors import ConfigError


@pytest.mark.parametrize("d", dtypes.DTYPES, ids=lambda d: d.name)
def test_every_form_agrees_with_its_library(d):
    assert onnx.helper.tensor_dtype_to_string(d.onnx) == f"TensorProto.{ir.DataType(d.onnx).name}"
    assert d.torch.itemsize == d.itemsize == ir.DataType(d.onnx).itemsize
    assert dtypes.from_torch(d.torch) is d is dtypes.dtype(d.onnx) is dtypes.dtype(d.name)
    if d.numpy_name is not None:
        assert onnx.helper.tensor_dtype_to_np_dtype(d.onnx) == d.numpy == torch.empty(0, dtype=d.torch).numpy().dtype
    assert d.bits.itemsize == d.itemsize
    assert dtypes.from_ort(d.ort) is d
    assert dtypes.from_safetensors(d.safetensors) is d
    assert d.is_float == d.torch.is_floating_point


def test_ort_type_strings_are_onnxruntimes():
    """The ORT strings are what a session reports for inputs of each type."""
    import onnxruntime as ort

    for d in dtypes.DTYPES:
        x = onnx.helper.make_tensor_value_info("x", d.onnx, [1])
        y = onnx.helper.make_tensor_value_info("y", d.onnx, [1])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].type == d.ort


def test_trt_names_are_tensorrt_members():
    trt = pytest.importorskip("tensorrt_rtx")
    for d in dtypes.DTYPES:
        if d.trt_name is None:
            with pytest.raises(ConfigError, match="TensorRT has no"):
                d.trt(trt)
        else:
            assert dtypes.from_trt(d.trt(trt)) is d


def test_precisions_and_refusals():
    assert dtypes.PRECISIONS == ("fp32", "fp16", "bf16")
    assert dtypes.precision("bf16").torch is torch.bfloat16 and dtypes.dtype("bf16").numpy is None
    assert dtypes.FLOAT_ONNX_TYPES == {1, 10, 16, 11} and ir.DataType.FLOAT16 in dtypes.FLOAT_ONNX_TYPES
    assert dtypes.tensor_name(ir.DataType.INT64) == "int64" and dtypes.tensor_name(999) == "999"
    for bad in ("fp8", "int64"):  # int64 is a tensor type, not a model precision
        with pytest.raises(ConfigError, match="unsupported dtype .* use one of fp32, fp16, bf16"):
            dtypes.precision(bad)
    with pytest.raises(ConfigError, match="unsupported dtype 'fp8'"):
        dtypes.dtype("fp8")
    assert np.dtype(dtypes.dtype("bf16").bits) == np.int16
