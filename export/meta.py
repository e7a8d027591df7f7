"""Modules on the meta device (names and shapes only, no memory), built without torch's random init.

The exporter builds meta Decoders to learn parameter names, shapes and order. Random init means nothing on
meta tensors, and torch runs ``normal_`` (nn.Embedding's init) there through a Python decomposition whose first
call imports torch._dynamo: ~0.6 s of an export that traces nothing (a trace-cache hit, export/trace_cache.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

_RANDOM_INIT = (torch.Tensor.normal_, torch.Tensor.uniform_)


def _is_init(func) -> bool:
    """torch.nn.init's functions (they dispatch to torch-function modes themselves) and in-place random fills."""
    return func in _RANDOM_INIT or getattr(func, "__module__", None) == "torch.nn.init"


class _SkipRandomInitOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
        if isinstance(target, torch.Tensor) and target.is_meta and _is_init(func):
            return target
        return func(*args, **kwargs)


@contextmanager
def meta_device() -> Iterator[None]:
    """``with meta_device(): Decoder(config)``: like ``with torch.device("meta")``, without the random init."""
    with torch.device("meta"), _SkipRandomInitOnMeta():
        yield
