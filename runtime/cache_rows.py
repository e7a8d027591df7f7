"""Copy one sequence's K/V rows between two states' caches, whatever holds them (runtime/side_prefill.py: prompts
prefilled in a small side state join their rows of the shared cache).

``Backend.caches(state)`` gives the live buffers in contract order: torch tensors (tensorrt), numpy arrays
(torch backend on the CPU) or OrtValues (ort). An OrtValue is viewed in place as a torch tensor through the
array interface of its memory (``__array_interface__`` on the CPU, ``__cuda_array_interface__`` on CUDA);
bfloat16 is viewed as int16, which copies the same bits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..dtypes import from_ort



class _Interface:
    def __init__(self, value: Any) -> None:
        desc = {"shape": tuple(value.shape()), "typestr": from_ort(value.data_type()).bits.str,
                "data": (value.data_ptr(), False), "version": 3}
        if value.device_name().lower() == "cpu":
            self.__array_interface__ = desc
        else:
            self.__cuda_array_interface__ = {**desc, "strides": None}


def as_torch(buffer: Any) -> Any:
    """A torch view (no copy) of one cache buffer."""
    import torch

    if isinstance(buffer, torch.Tensor):
        return buffer
    if isinstance(buffer, np.ndarray):
        return torch.from_numpy(buffer)
    view = _Interface(buffer)
    if hasattr(view, "__array_interface__"):
        return torch.from_numpy(np.asarray(view))
    return torch.as_tensor(view)  # torch finds the device that owns the pointer


class RowCopier:
    """Views of two states' caches, made once; ``copy(dst_row, n, src_row)`` copies positions [0, n) of one
    sequence (on the current stream: a CUDA caller puts it on the backend's)."""

    def __init__(self, dst_buffers: list[Any], src_buffers: list[Any]) -> None:
        self.dst = [as_torch(b) for b in dst_buffers]
        self.src = [as_torch(b) for b in src_buffers]

    def copy(self, dst_row: int, n: int, src_row: int = 0) -> None:
        for d, s in zip(self.dst, self.src):
            d[dst_row, :, :n].copy_(s[src_row, :, :n])
