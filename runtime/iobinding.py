"""Torch tensors bound to an ONNX Runtime IOBinding by address: the one binder of the ort and ort-tp backends.

The element type comes from the tensor's own dtype, the device from the tensor, so a binding can never
disagree with the buffer it points at.
"""

from __future__ import annotations

from typing import Any

from ..dtypes import from_torch


def bind_tensor(binding: Any, name: str, tensor: Any, output: bool) -> None:
    """Bind `tensor` (contiguous) as graph input or output `name` of `binding` (an onnxruntime IOBinding)."""
    bind = binding.bind_output if output else binding.bind_input
    device = tensor.device
    bind(name, device.type, device.index or 0, from_torch(tensor.dtype).onnx, list(tensor.shape), tensor.data_ptr())
