"""The one dtype table: every element type decodekit handles, by name, with its ONNX, ONNX Runtime, numpy, torch,
TensorRT and safetensors forms and its size in bytes.

    dtype("fp16").onnx == 10      dtype("float16").torch is torch.float16      dtype(10).ort == "tensor(float16)"
    from_torch(torch.bfloat16).trt_name == "BF16"      dtype("bf16").numpy is None (numpy has no bfloat16)

Names: ``name`` is the tensor name the manifest's I/O specs use ("float16"); float types also have the model
precision name of the CLI and the manifest (``precision``: "fp16"). ``dtype()`` takes either, or an ONNX element
type (``onnx_ir.DataType`` values are the same integers). Standard library only at import, like errors.py:
numpy, torch and TensorRT forms are looked up when asked for, so ``decodekit --help`` loads none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class DType:
    name: str  # torch / numpy attribute name, and the manifest's TensorSpec dtype
    precision: str | None  # the model precision name of the CLI and manifest (fp32 / fp16 / bf16), floats only
    onnx: int  # onnx.TensorProto element type (= onnx_ir.DataType)
    ort: str  # ONNX Runtime's NodeArg.type
    itemsize: int  # bytes per element
    trt_name: str | None  # tensorrt.DataType member
    safetensors: str  # the dtype string of a safetensors header
    numpy_name: str | None  # None: numpy has no such type (bfloat16)

    @property
    def is_float(self) -> bool:
        return self.name.startswith(("float", "bfloat"))

    @property
    def torch(self) -> Any:
        import torch

        return getattr(torch, self.name)

    @property
    def numpy(self) -> Any:
        """The numpy dtype, None where numpy has none (bfloat16: see ``bits``)."""
        import numpy as np

        return None if self.numpy_name is None else np.dtype(self.numpy_name)

    @property
    def bits(self) -> Any:
        """A numpy dtype of the same size that holds the same bits: the numpy dtype itself, else a signed int (which
        torch can view and copy on every device)."""
        import numpy as np

        return self.numpy if self.numpy_name is not None else np.dtype(f"int{8 * self.itemsize}")

    def trt(self, trt: Any) -> Any:
        """This type in a TensorRT module (``tensorrt`` or ``tensorrt_rtx``: graphs/trt/api.py picks one)."""
        if self.trt_name is None:
            raise ConfigError(f"TensorRT has no {self.name} tensors")
        return getattr(trt.DataType, self.trt_name)


DTYPES: tuple[DType, ...] = (
    DType("float32", "fp32", 1, "tensor(float)", 4, "FLOAT", "F32", "float32"),
    DType("float16", "fp16", 10, "tensor(float16)", 2, "HALF", "F16", "float16"),
    DType("bfloat16", "bf16", 16, "tensor(bfloat16)", 2, "BF16", "BF16", None),
    DType("float64", None, 11, "tensor(double)", 8, None, "F64", "float64"),
    DType("int64", None, 7, "tensor(int64)", 8, "INT64", "I64", "int64"),
    DType("int32", None, 6, "tensor(int32)", 4, "INT32", "I32", "int32"),
    DType("int8", None, 3, "tensor(int8)", 1, "INT8", "I8", "int8"),
    DType("uint8", None, 2, "tensor(uint8)", 1, "UINT8", "U8", "uint8"),
    DType("bool", None, 9, "tensor(bool)", 1, "BOOL", "BOOL", "bool"),
)
PRECISIONS: tuple[str, ...] = tuple(d.precision for d in DTYPES if d.precision)  # fp32, fp16, bf16

_BY_KEY: dict[Any, DType] = {k: d for d in DTYPES for k in (d.name, d.precision, d.onnx) if k is not None}


def dtype(key: str | int) -> DType:
    """The DType of a name ("float16"), a precision ("fp16") or an ONNX element type (10, ir.DataType.FLOAT16)."""
    found = _BY_KEY.get(key if isinstance(key, str) else int(key))
    if found is None:
        raise ConfigError(f"unsupported dtype {key!r}; supported: {', '.join(PRECISIONS)} "
                          f"(tensors: {', '.join(d.name for d in DTYPES)})")
    return found


def precision(name: str) -> DType:
    """A model precision (fp32 / fp16 / bf16) of the CLI and manifest; anything else is refused in one line."""
    if name not in PRECISIONS:
        raise ConfigError(f"unsupported dtype {name!r}; use one of {', '.join(PRECISIONS)}")
    return dtype(name)


def tensor_name(onnx_type: int) -> str:
    """The manifest name of an ONNX element type ("float16"); the number itself for a type not in the table."""
    found = _BY_KEY.get(int(onnx_type))
    return found.name if found is not None else str(int(onnx_type))


def from_ort(type_string: str) -> DType:
    """The DType of an ONNX Runtime type string ("tensor(float16)")."""
    found = next((d for d in DTYPES if d.ort == type_string), None)
    if found is None:
        raise ConfigError(f"unsupported ONNX Runtime type {type_string!r}")
    return found


def from_torch(torch_dtype: Any) -> DType:
    """The DType of a torch dtype (torch.float16)."""
    return dtype(str(torch_dtype).removeprefix("torch."))


def from_trt(trt_dtype: Any) -> DType:
    """The DType of a TensorRT DataType (its member name: HALF, BF16, ...)."""
    found = next((d for d in DTYPES if d.trt_name == trt_dtype.name), None)
    if found is None:
        raise ConfigError(f"unsupported TensorRT type {trt_dtype.name}")
    return found


def from_safetensors(code: str) -> DType | None:
    """The DType of a safetensors header dtype ("F16"); None for one outside the table."""
    return next((d for d in DTYPES if d.safetensors == code), None)


FLOAT_ONNX_TYPES: frozenset[int] = frozenset(d.onnx for d in DTYPES if d.is_float)
