"""Torch tensors bound to an ONNX Runtime IOBinding by address: the one binder of the ort and ort-tp backends.

The element type comes from the tensor's own dtype, the device from the tensor, so a binding can never
disagree with the buffer it points at.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _element_types() -> dict[Any, int]:
    import torch
    from onnx import TensorProto as T

    return {torch.float32: T.FLOAT, torch.float16: T.FLOAT16, torch.bfloat16: T.BFLOAT16, torch.int64: T.INT64,
            torch.int32: T.INT32, torch.bool: T.BOOL}


def bind_tensor(binding: Any, name: str, tensor: Any, output: bool) -> None:
    """Bind `tensor` (contiguous) as graph input or output `name` of `binding` (an onnxruntime IOBinding)."""
    bind = binding.bind_output if output else binding.bind_input
    device = tensor.device
    bind(name, device.type, device.index or 0, _element_types()[tensor.dtype], list(tensor.shape), tensor.data_ptr())
